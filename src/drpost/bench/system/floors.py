"""System benchmark, the floors: the analytic floor of a regularized step next to its measurement (the standard
step, minus the weight-gradient GEMMs a one-pass backward skips, plus one assembly GEMM per layer over the rows that
carry weight, plus the scoring FLOPs/bytes at the calibrated rates), and the check of ``scoring="auto"`` against the
fixed scoring methods on one captured backward.

Part of ``drpost.bench.system`` (run it with ``drpost bench system``).
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from drpost.bench.system.cases import Case, Method


def block_shapes(reg) -> list[list[tuple[int, int, int]]]:
    """Per block: (p, q, uses) of each factored weight (one use each: the benchmark models are untied)."""
    return [[(p.shape[0], p.numel() // p.shape[0], 1) for p in b.factored] for b in reg.capture.blocks]

def floor(case: Case, me: Method, t_std: dict[str, float], rates) -> dict | None:
    """Analytic floor (seconds) of a regularizer method next to its measurement; None for others."""
    from drpost.geometry import cost

    if me.kind != "dr" or me.name not in case.reports:
        return None
    reg, rep = case.regs[me.name], case.reports[me.name]
    if rep.skipped:
        return None
    shapes = block_shapes(reg)
    n, m, T = case.n, case.m, case.T
    R = n + m
    need_gram, need_tgram, trivial = reg.needs()
    std = sum(t_std.values())
    score = 0.0
    for l, b in enumerate(reg.capture.blocks):
        meth = rep.scoring.get(b.name)
        if trivial or not shapes[l] or meth is None:
            continue
        if meth == "compress":
            score += cost.compress_seconds(shapes[l], n, m, T, *reg.sketch, need_gram, rates)
        else:
            score += cost.method_costs(shapes[l], n, m, T, need_gram or need_tgram, rates)[meth]
    w = rep.weights  # (L', n)
    tw = rep.target_weight
    L = len(shapes)
    kept = []
    for l in range(L):
        wl = w[l if w.shape[0] > 1 else 0]
        tl = tw[l if tw.shape[0] > 1 else 0]
        kept.append(int((wl != 0).sum()) + (m if float(tl) != 0 else 0))
    all_shapes = [s for sh in shapes for s in sh]
    wgrad = cost.gemm_seconds(all_shapes, R, T, rates)
    if me.one_pass:
        assembly = sum(cost.gemm_seconds(shapes[l], kept[l], T, rates) for l in range(L))
        total = std - wgrad + assembly + score
    else:  # two_pass: score, then a second forward/backward of the weighted rows (lower bound: one backward
        # even for layer scope, which the reference runs once per block through the shared graph)
        frac = 1.0 if w.shape[0] > 1 else max(kept) / R
        total = std + score + frac * (t_std.get("forward", 0) + t_std.get("backward", 0))
        assembly = None
    return {"floor_s": total, "scoring_est_s": score, "wgrad_skipped_s": wgrad if me.one_pass else 0.0,
            "assembly_est_s": assembly}

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
                    t0 = time.perf_counter()
                    block_stats(b, l, meth, tc, R_g, need_gram, False)
                    if case.device.type == "cuda":
                        torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t0)
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
