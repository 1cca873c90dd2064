"""The geometry of one step: the merged batch and the per-block quantities the feasible sets need.

Owned here:

* ``MergedBatch``: general rows then target rows in one padded batch, with each row's sample id (general samples
  ``0..n-1``, target samples ``0..m-1``) and, once the forward has run, loss tokens per sample;
* ``LocalGeometry``: the one-process implementation of the step's geometry interface,
  ``geometry(reg, blocks, mb, lr, timer, report) -> StepGeometry | None``; the data-parallel implementation is
  ``geometry/distributed.py``'s ``DistributedStep``. Per block it picks a scoring method (``reg.scoring_method``) and
  computes the scores ``<u_i, g_T>``, ``||g_T||^2`` and, where the feasible set needs them, the Gram ``<u_i, u_j>``,
  the target-sample Gram and sketches (``geometry/kernels.py``), then groups rows into samples; blocks scored
  ``direct`` (every LoRA matrix) take one GEMM each and are finished together with a few batched products;
* ``finish_geometry``: stacks the blocks into a ``StepGeometry`` and refuses non-finite values (the step is skipped).

The math is in ``docs/design.md``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from drpost.feasible.base import StepGeometry, ensure_finite
from drpost.geometry.kernels import Workspace, block_stats, row_products


# --------------------------------------------------------------------------- batches
def _pad_to(x: Tensor, T: int, value) -> Tensor:
    if x.shape[1] == T:
        return x
    pad = x.new_full((x.shape[0], T - x.shape[1], *x.shape[2:]), value)
    return torch.cat([x, pad], 1)


def rows_of(batch: dict) -> int:
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ValueError("a batch must be a dict with at least 'input_ids' (R, T)")
    return int(batch["input_ids"].shape[0])


def sample_ids(batch: dict, R: int, device) -> Tensor:
    """Compact sample ids 0..n-1 for the rows of a batch (every row its own sample by default).  -> (R,)"""
    si = batch.get("sample_index")
    if si is None:
        return torch.arange(R, device=device)
    si = torch.as_tensor(si, device=device)
    if si.shape != (R,):
        raise ValueError(f"'sample_index' must have shape ({R},), got {tuple(si.shape)}")
    return torch.unique(si, sorted=True, return_inverse=True)[1]


def merge_batches(general: dict, target: dict, device) -> dict:
    """Concatenate target rows after the general rows, right-padding sequence tensors to a common length."""
    Tg, Tt = general["input_ids"].shape[1], target["input_ids"].shape[1]
    T = max(Tg, Tt)
    missing = set(general) ^ set(target)
    missing.discard("sample_index")
    if missing:
        raise ValueError(f"general and target batches must carry the same keys; differing: {sorted(missing)}")
    out = {}
    for k, g in general.items():
        if k == "sample_index":
            continue
        t = target[k]
        if not isinstance(g, Tensor):
            out[k] = g
            continue
        g, t = g.to(device), torch.as_tensor(t).to(device)
        if g.dim() >= 2 and g.shape[1] == Tg and t.shape[1] == Tt:
            fill = -100 if k == "labels" else 0
            g, t = _pad_to(g, T, fill), _pad_to(t, T, fill)
        out[k] = torch.cat([g, t], 0)
    return out


def take_rows(batch: dict, idx: Tensor) -> dict:
    R = rows_of(batch)
    return {k: (v[idx] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == R else v) for k, v in batch.items()}


def indicator(ids: Tensor, n: int, dtype) -> Tensor:
    """(n, R) with S[i, r] = 1 if row r belongs to sample i."""
    return torch.nn.functional.one_hot(ids, n).t().to(dtype)


@dataclass
class MergedBatch:
    """General rows ``0..R_g-1`` then target rows, one batch; ``batch['sample_index']`` holds general ids, then
    target ids offset by n. ``counts`` / ``target_counts`` are filled by the forward stage."""

    batch: dict
    g_ids: Tensor  # (R_g,) general sample of each general row
    t_ids: Tensor  # (R_t,) target sample of each target row
    n: int  # general samples
    m: int  # target samples
    counts: Tensor | None = None  # (n,) loss tokens per general sample
    target_counts: Tensor | None = None  # (m,)

    @classmethod
    def build(cls, general: dict, target: dict, device) -> MergedBatch:
        if target is None or rows_of(target) == 0:
            raise ValueError("option 'target': the target batch is empty; drpost needs at least one target row")
        R_g = rows_of(general)
        if R_g == 0:
            raise ValueError("option 'general': the general batch is empty")
        g_ids = sample_ids(general, R_g, device)
        t_ids = sample_ids(target, rows_of(target), device)
        n, m = int(g_ids.max()) + 1, int(t_ids.max()) + 1
        merged = merge_batches(general, target, device)
        merged["sample_index"] = torch.cat([g_ids, t_ids + n])
        return cls(merged, g_ids, t_ids, n, m)

    @property
    def R_g(self) -> int:
        return int(self.g_ids.shape[0])

    @property
    def R(self) -> int:
        return int(self.batch["input_ids"].shape[0])

    @property
    def T(self) -> int:
        return int(self.batch["input_ids"].shape[1])

    def set_counts(self, row_counts: Tensor) -> None:
        """Loss tokens per sample from the loss function's per-row counts (R,)."""
        dev, R_g = row_counts.device, self.R_g
        self.counts = torch.zeros(self.n, dtype=row_counts.dtype, device=dev).index_add_(0, self.g_ids,
                                                                                           row_counts[:R_g])
        self.target_counts = torch.zeros(self.m, dtype=row_counts.dtype, device=dev).index_add_(
            0, self.t_ids, row_counts[R_g:])


def row_coefficients(coefs, mb: MergedBatch, ds, L: int) -> Tensor:
    """(L, R) per-row coefficients from a feasible set's ``Coefficients``: general rows take their sample's
    coefficient, target rows c_T / N_T (``ds``: data parallel, this rank's samples and the global N_T)."""
    cc = coefs.coef if ds is None else ds.local(coefs.coef)  # this rank's samples
    coef = cc.expand(L, mb.n) if cc.shape[0] == 1 else cc
    tcoef = coefs.target_coef.expand(L) if coefs.target_coef.shape[0] == 1 else coefs.target_coef
    n_T = mb.target_counts.sum() if ds is None else ds.target_tokens
    return torch.cat([coef[:, mb.g_ids], (tcoef / n_T)[:, None].expand(L, mb.R - mb.R_g)], 1)


STAGE_CLOCK = {"fn": time.perf_counter}  # the stages' clock: wall time; the system benchmark may set process_time


class Timer:
    """Accumulates time per named stage on ``STAGE_CLOCK`` (wall time unless a benchmark sets another clock;
    CUDA-synchronized on GPU)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.t: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                if timer.cuda:
                    torch.cuda.synchronize()
                self.t0 = STAGE_CLOCK["fn"]()

            def __exit__(self, *exc):
                if timer.cuda:
                    torch.cuda.synchronize()
                timer.t[name] = timer.t.get(name, 0.0) + STAGE_CLOCK["fn"]() - self.t0

        return _Ctx()

    @contextlib.contextmanager
    def within(self, inner: str, outer: str):
        """Time a sub-stage that runs inside the running stage ``outer``: its seconds count under ``inner`` and are
        taken out of ``outer`` (which adds the whole span when it ends)."""
        before = self.t.get(inner, 0.0)
        try:
            with self(inner):
                yield
        finally:
            self.t[outer] = self.t.get(outer, 0.0) - (self.t[inner] - before)


# --------------------------------------------------------------------------- the local geometry
class LocalGeometry:
    """One process: every block's scores (and Gram where needed) from the captured factors.

    Blocks scored ``direct`` (every block holding per-row gradients, e.g. LoRA's) take one GEMM each
    (``kernels.row_products``) and are finished together: scores, target norms and Grams of all of them with a few
    batched products (``batched=False``: one ``block_stats`` per block, the reference the tests compare against)."""

    def __init__(self, batched: bool = True):
        self.batched = batched

    def geometry(self, reg, blocks, mb: MergedBatch, lr, timer: Timer, report, stream=None) -> StepGeometry | None:
        """The step's ``StepGeometry`` (None: non-finite, skip the step). ``stream`` (``geometry/stream.py``'s
        ``Streamer``): a block it can take that is scored ``direct`` is solved and assembled at once."""
        needs = reg.needs()
        n_i, n_t = mb.counts, mb.target_counts
        L, n, m, R_g, R = len(blocks), mb.n, mb.m, mb.R_g, mb.R
        dev = n_i.device
        if needs.trivial:
            z = torch.zeros(L, n, dtype=n_i.dtype, device=dev)
            return StepGeometry(reg.blocks, z, torch.zeros(L, dtype=z.dtype, device=dev), n_i, n_t, lr=lr)
        tc = torch.zeros(R, dtype=n_t.dtype, device=dev)  # (R,) target coefficients: 1/N_T on target rows
        tc[R_g:] = 1.0 / n_t.sum()
        S_g, S_t = indicator(mb.g_ids, n, n_i.dtype), indicator(mb.t_ids, m, n_i.dtype)  # (n, R_g), (m, R_t)
        any_gram = needs.gram or needs.target_gram
        scores, tsq, grams = [None] * L, [None] * L, [None] * L
        tgrams, sketches = [], []
        prods: dict[tuple, list[tuple[int, Tensor]]] = {}  # (dtype, device) -> [(block, (R, R_t or R))]
        ws = Workspace()  # direct's per-row gradients, block after block: one buffer for the step
        with timer("scoring"):
            for l, b in enumerate(blocks):
                streamable = stream is not None and stream.eligible(b)
                meth, st = reg.scoring_method(l, b, R_g, R - R_g, mb.T, any_gram, tc=tc,
                                              assembly_rows=stream.assembly_rows if streamable else None)
                report.scoring[b.name] = meth
                if streamable and meth == "direct" and st is None:  # whole rows, then scores, solve and update
                    stream.hold(b, ws)
                    P, _ = row_products(b, R_g, tc, full=needs.gram)  # (R, R_t) or (R, R)
                    _finish_products([(l, P)], tc, S_g, R_g, needs.gram, scores, tsq, grams)
                    stream.finish(l, b, scores[l], tsq[l], grams[l] if needs.gram else None)
                    continue
                if st is None and meth == "direct" and self.batched and not needs.target_gram:
                    P, b.rows = row_products(b, R_g, tc, full=needs.gram, workspace=ws)
                    prods.setdefault((P.dtype, P.device), []).append((l, P))
                else:
                    if st is None:
                        st = block_stats(b, l, meth, tc, R_g, needs.gram, needs.target_gram, reg.sketcher,
                                         need_target_sketch=needs.target_gram, workspace=ws)
                    b.rows = st.rows  # per-row gradients kept for the assembly (or None)
                    dt = st.row_scores.dtype
                    Sg, St = S_g.to(dt), S_t.to(dt)
                    scores[l], tsq[l] = Sg @ st.row_scores, st.target_sq
                    if needs.gram:
                        grams[l] = Sg @ st.row_gram @ Sg.t()
                    if needs.target_gram:
                        tgrams.append(St @ st.target_row_gram @ St.t())
                        sketches.append((St @ st.target_row_sketch) / n_t.to(dt)[:, None])
                if b.rows is not None:  # they replace the factors, whose memory the next blocks then reuse
                    b.factored = {p: [] for p in b.factored}
            for group in prods.values():
                _finish_products(group, tc, S_g, R_g, needs.gram, scores, tsq, grams)
        return finish_geometry(reg.blocks, torch.stack(scores), tsq, grams if needs.gram else [], tgrams, sketches,
                               n_i, n_t, needs.gram, needs.target_gram, lr, report)


def _finish_products(group: list[tuple[int, Tensor]], tc: Tensor, S_g: Tensor, R_g: int, need_gram: bool,
                     scores: list, tsq: list, grams: list) -> None:
    """Scores, ||g_T||^2 and Grams of several blocks at once from their row products (``row_products``)."""
    idx = [l for l, _ in group]
    P = torch.stack([p for _, p in group])  # (k, R, R_t) or (k, R, R)
    dt = P.dtype
    tct, Sg = tc[R_g:].to(dt), S_g.to(dt)  # (R_t,), (n, R_g)
    Pt = P[:, :, R_g:] if need_gram else P  # (k, R, R_t): products with the target rows
    row_scores = Pt[:, :R_g] @ tct  # (k, R_g)
    s = row_scores @ Sg.t()  # (k, n)
    t = (Pt[:, R_g:] @ tct) @ tct  # (k,)
    g = Sg @ P[:, :R_g, :R_g] @ Sg.t() if need_gram else None  # (k, n, n)
    for j, l in enumerate(idx):
        scores[l], tsq[l] = s[j], t[j]
        if need_gram:
            grams[l] = g[j]


def finish_geometry(names, scores: Tensor, tsq, grams, tgrams, sketches, counts: Tensor, tcounts: Tensor,
                    need_gram: bool, need_tgram: bool, lr, report) -> StepGeometry | None:
    """Stack per-block quantities into a ``StepGeometry`` (scores (L, n)), record the scores in the report, and
    return None when anything is non-finite (the step is then skipped)."""
    dt = scores.dtype
    geo = StepGeometry(
        block_names=names,
        scores=scores,
        target_sq=torch.stack(tsq).to(dt),
        counts=counts.to(dt),
        target_counts=tcounts.to(dt),
        gram=torch.stack(grams) if need_gram else None,
        target_gram=torch.stack(tgrams) if need_tgram else None,
        target_sketch=_pad_stack(sketches) if need_tgram else None,
        lr=lr,
    )
    report.block_scores = geo.scores
    report.scores = geo.scores.sum(0)
    if not ensure_finite(geo.scores, geo.target_sq, geo.gram, geo.target_gram):
        return None
    return geo


def _pad_stack(xs: list[Tensor]) -> Tensor:
    """Stack (m, D_l) sketches of different widths into (L, m, D_max) with zero padding (inner products kept)."""
    D = max(x.shape[1] for x in xs)
    return torch.stack([torch.nn.functional.pad(x, (0, D - x.shape[1])) for x in xs])


def time_candidates(block, block_idx: int, candidates, tc: Tensor, n_rows: int, need_gram: bool,
                    need_target_gram: bool, sketcher):
    """Autotune: run each scoring candidate once on this block; (fastest method, its stats)."""
    best, best_t, best_st = None, math.inf, None
    cuda = tc.device.type == "cuda"
    for meth in candidates:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        st = block_stats(block, block_idx, meth, tc, n_rows, need_gram, need_target_gram, sketcher,
                         need_target_sketch=need_target_gram)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if dt < best_t:
            best, best_t, best_st = meth, dt, st
    return best, best_st
