"""System benchmark, the floors: the analytic floor of a regularized step next to its measurement, and the check of
``scoring="auto"`` against the fixed scoring methods on one captured backward.

The floor models what the engine runs (``drpost.step``, ``geometry/capture.py``, ``kernels.py``), per factored
weight of shape (p, q) with R = n + m rows of T tokens, at the calibrated GEMM rate F and copy bandwidth B
(``cost.calibrate``), 4-byte elements. Below, a dense use's T is the positions it runs on: the LM head's is the loss
window (the last k positions, ``objectives.label_window``) when the rows have a prompt (``prompt_frac``):

* the measured standard step, minus what the captured backward skips: autograd's weight-gradient GEMM of every
  dense use (2 R T p q / F) and, for an embedding lookup (a one-hot use), its scatter into a dense gradient
  ((R T q + p q) 4 / B);
* *held* weights (a weight alone in its block whose per-row gradients take no more memory than its factors,
  p q <= T (p + q): every LoRA matrix) get their per-row gradients in the backward instead: R small GEMMs of the
  same FLOPs, plus writing R p q elements; they are scored by one product with the target rows' gradients
  (2 R m p q, or 2 R^2 p q with a Gram, + reading R p q; ``kernels.row_products``), or sketched for ``compress``
  (P_1 G_r P_2^T), and assembled by one GEMV per weight (2 R p q / F + reading R p q);
* every other weight: scored by the method the step chose (``cost.method_costs`` / ``cost.compress_seconds``; a
  weight that ``direct`` scoring materialized and kept, p q <= T (p + q), is then assembled by a GEMV too), and
  assembled by one GEMM per dense use over the rows that carry weight (2 kept T p q / F) plus a scatter per one-hot
  use (kept T q 4 / B).
Two-pass methods: the standard step plus the scoring plus a second forward/backward of the rows that carry weight.
Per-block Python and dispatch overheads are not in the floor: the gap between measurement and floor shows them.

Part of ``drpost.bench.system`` (run it with ``drpost bench system``).
"""

from __future__ import annotations

import math
import statistics
from typing import NamedTuple

import torch

from drpost.bench.system.cases import Case, Method, now

ELEM = 4  # bytes per element: the benchmark models are float32


class Weight(NamedTuple):
    """One factored weight of a block as the engine treats it at T tokens per row."""

    p: int  # parameter rows
    q: int  # parameter columns (numel / p)
    dense: int  # dense uses (Linear / Conv1D calls)
    onehot: int  # one-hot uses (embedding lookups)
    held: bool  # per-row gradients materialized in the backward
    tokens: int  # positions per row of its dense uses, summed (T each; the LM head: its window)


def block_weights(reg, T: int, head_T: int | None = None) -> list[list[Weight]]:
    """Per capture block, its factored weights (a tied embedding and LM head: one weight, one dense and one one-hot
    use). ``held`` follows the capture's rule: ``materialize`` (set for a Linear/Conv1D weight alone in its block)
    and p q <= T (p + q) (``handlers._FactoredHandler._materialized``, equal element sizes). ``head_T``: the positions
    the model's output embedding runs on (its loss window; None = T)."""
    from drpost.geometry.handlers import EmbeddingHandler

    cap = reg.capture
    head = reg.model.get_output_embeddings() if head_T is not None else None
    out: list[dict[int, list]] = [{} for _ in cap.blocks]
    for i, h in enumerate(cap.handlers):
        t = head_T if head is not None and h.module is head else T
        for w in h.factored_params():
            p, q = w.shape[0], w.numel() // w.shape[0]
            e = out[cap.block_of[i]].setdefault(id(w), [p, q, 0, 0, False, 0])
            if isinstance(h, EmbeddingHandler):
                e[3] += 1
            else:
                e[2] += 1
                e[5] += t
            e[4] = e[4] or (getattr(h, "materialize", False) and p * q <= t * (p + q))
    return [[Weight(*e) for e in blk.values()] for blk in out]


def _rows_kept(ws: list[Weight], meth: str | None, T: int) -> bool:
    """Whether the block reaches the assembly holding per-row gradients (then: one GEMV per weight): held in the
    backward, or materialized by ``direct`` scoring and no larger than the factors (``kernels.worth_keeping``)."""
    if any(w.held for w in ws):
        return True
    factors = sum(w.tokens * (w.p + w.q) + T * w.onehot * (w.q + 1) for w in ws)
    return meth == "direct" and sum(w.p * w.q for w in ws) <= factors


def _held_scoring_s(w: Weight, meth: str, n: int, m: int, sketch: tuple[int, int], gram: bool, rates) -> float:
    """Scoring a held weight from its per-row gradients (R, p, q): one product with the target rows (or the Gram),
    or the Kronecker sketch P_1 G_r P_2^T (identity where k >= the dimension) and its products."""
    R, p, q = n + m, w.p, w.q
    fl, by = 0.0, R * p * q * ELEM
    if meth == "compress":
        k1, k2 = min(sketch[0], p), min(sketch[1], q)
        fl += (2 * R * k1 * p * q if k1 < p else 0) + (2 * R * k1 * q * k2 if k2 < q else 0)
        fl += 2 * R * k1 * k2 + (2 * n * n * k1 * k2 if gram else 0)
    else:
        fl += 2 * R * (R if gram else m) * p * q
    return fl / rates.flops_per_s + by / rates.bytes_per_s


def _scoring_s(ws: list[Weight], meth: str, n: int, m: int, T: int, sketch, need_gram: bool, gram: bool,
               rates) -> float:
    from drpost.geometry import cost

    held = [w for w in ws if w.held]
    # an embedding alone: priced as one dense use at T
    rest = [(w.p, w.q, w.dense or 1, w.tokens or T) for w in ws if not w.held]
    s = sum(_held_scoring_s(w, meth, n, m, sketch, gram, rates) for w in held)
    if rest:
        if meth == "compress":
            s += cost.compress_seconds(rest, n, m, T, *sketch, need_gram, rates)
        else:
            s += cost.method_costs(rest, n, m, T, gram, rates)[meth]
    return s


def floor(case: Case, me: Method, t_std: dict[str, float], rates) -> dict | None:
    """Analytic floor (seconds) of a regularizer method next to its measurement (module docstring); None for
    others. Also its parts: skipped weight gradients, per-row materialization, scoring and assembly estimates."""
    if me.kind != "dr" or me.name not in case.reports:
        return None
    reg, rep = case.regs[me.name], case.reports[me.name]
    if rep.skipped:
        return None
    F, B = rates.flops_per_s, rates.bytes_per_s
    n, m, T = case.n, case.m, case.T
    R = n + m
    head_T = case.head_T
    need_gram, need_tgram, trivial = reg.needs()
    std = sum(t_std.values())
    if trivial:  # full_training / target_only: one plain forward/backward, nothing captured (step.py)
        return {"floor_s": std, "scoring_est_s": 0.0, "wgrad_skipped_s": 0.0, "materialize_est_s": 0.0,
                "assembly_est_s": 0.0, "held_weights": 0}
    w, tw = rep.weights, rep.target_weight  # (L', n), (L',)
    wgrad = mat = score = asm = 0.0
    held = kept_max = 0
    streamed = set(rep.streamed)
    for l, (b, ws) in enumerate(zip(reg.capture.blocks, block_weights(reg, T, head_T), strict=True)):
        if not ws:
            continue
        wl, tl = w[l if w.shape[0] > 1 else 0], tw[l if tw.shape[0] > 1 else 0]
        kept = int((wl != 0).sum()) + (m if float(tl) != 0 else 0)  # rows that carry weight in this block
        kept_max = max(kept_max, kept)
        meth = None if trivial else rep.scoring.get(b.name)
        for x in ws:
            g = 2 * R * x.tokens * x.p * x.q / F + x.onehot * (R * T * x.q + x.p * x.q) * ELEM / B
            wgrad += g
            if x.held:
                held += 1
                mat += g + R * x.p * x.q * ELEM / B
        if meth is not None:
            score += _scoring_s(ws, meth, n, m, T, reg.sketch, need_gram, need_gram or need_tgram, rates)
        if _rows_kept(ws, meth, T) or b.name in streamed:  # streamed: a GEMV over the rows direct built
            asm += sum(2 * R * x.p * x.q / F + R * x.p * x.q * ELEM / B for x in ws)
        else:
            asm += sum(2 * kept * x.tokens * x.p * x.q / F
                       + x.onehot * (kept * T * x.q + (0 if x.dense else x.p * x.q)) * ELEM / B for x in ws)
    if me.one_pass:
        total = std - wgrad + mat + asm + score
        return {"floor_s": total, "scoring_est_s": score, "wgrad_skipped_s": wgrad, "materialize_est_s": mat,
                "assembly_est_s": asm, "held_weights": held}
    # two_pass: score, then a second forward/backward of the weighted rows (lower bound: one backward even for
    # layer scope, which the reference runs once per block through the shared graph)
    frac = 1.0 if w.shape[0] > 1 else kept_max / R
    total = std + score + frac * (t_std.get("forward", 0) + t_std.get("backward", 0))
    return {"floor_s": total, "scoring_est_s": score, "wgrad_skipped_s": 0.0, "materialize_est_s": 0.0,
            "assembly_est_s": None, "held_weights": 0}


def scoring_check(case: Case, rates, repeats: int) -> dict:
    """Scoring component only, on one captured backward: auto vs each fixed exact method vs per-block best."""
    from drpost.geometry.kernels import block_stats
    from drpost.objectives import causal_lm_loss
    from drpost.step import merge_batches  # noqa: F401

    name = "layerwise/one_pass/auto"
    if name not in case.regs:
        return {}
    reg = case.regs[name]
    cap = reg.capture
    R_g, R = case.n, case.n + case.m
    with cap:
        cap.rows = R
        loss, counts = causal_lm_loss(case.model, case.merged)
    cap.backward(loss.sum())
    blocks = cap.collect()
    tc = torch.zeros(R, dtype=torch.float32, device=case.device)
    tc[R_g:] = 1.0 / counts[R_g:].sum()
    out = {}
    for need_gram in (False, True):
        methods = ["full_ghost", "direct"] + ([] if need_gram else ["reduced_ghost"])
        times = {meth: [0.0] * len(blocks) for meth in methods}
        for meth in methods:
            for l, b in enumerate(blocks):
                if not b.factored:
                    continue
                ts = []
                for _ in range(repeats + 1):
                    if case.device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = now()
                    block_stats(b, l, meth, tc, R_g, need_gram, False)
                    if case.device.type == "cuda":
                        torch.cuda.synchronize()
                    ts.append(now() - t0)
                times[meth][l] = statistics.median(ts[1:])
        from drpost.geometry import cost

        auto = 0.0
        choices = {}
        for l, b in enumerate(blocks):
            if not b.factored:
                continue
            c = cost.choose(b, R_g, R - R_g, case.T, need_gram, rates)
            choices[c] = choices.get(c, 0) + 1
            auto += times[c][l]
        fixed = {meth: sum(v) for meth, v in times.items()}
        best_fixed = min(fixed, key=fixed.get)
        per_block_best = sum(min(times[meth][l] for meth in methods) for l in range(len(blocks)))
        out["gram" if need_gram else "scores"] = {
            "auto_s": auto, "fixed_s": fixed, "best_fixed": best_fixed,
            "auto_over_best_fixed": auto / fixed[best_fixed], "per_block_best_s": per_block_best,
            "auto_over_per_block_best": auto / per_block_best if per_block_best > 0 else math.nan,
            "auto_choices": choices}
    cap.reset()
    case.model.zero_grad(set_to_none=True)
    return out
