"""Data-parallel drpost: every rank computes the *global* step (same coefficients, same final ``.grad``).

Owns the collectives that turn one rank's share of a step into the global step (docs/design.md), and with them the
data-parallel implementation of the step's geometry interface (``LocalGeometry`` in step_geometry.py is the other).
``DataRegularizer(model, ..., process_group="auto")`` (the default) switches them on when
``torch.distributed`` is initialized with world size > 1; ``process_group=None`` keeps every rank local (each rank
its own independent step); a ``ProcessGroup`` uses that group. See docs/distributed.md for how to launch.

Each rank holds its own general rows (n_r samples) and target rows (m_r samples). The global step is the one-process
step on the union of all ranks' rows, general samples ordered by rank, then target samples ordered by rank:

  1. counts: all-gather the per-sample token counts N_i and N_t (so N, N_S, N_T are global);
  2. per block: the local target part ``sum_{t local} u_t / N_T`` is all-reduced (SUM) into the global ``g_T``:
     ``G_T`` (weight-shaped, the reduced ghost) for exact scores, or the target row of the per-row features when a
     Gram is needed (``direct``: exact per-sample gradients, ``compress``: per-sample sketches); local scores
     ``<u_i, g_T>`` are computed on each rank and all-gathered (L x n floats);
  3. the Gram, when the set needs it: all-gather of the per-sample feature rows (n_global x D_block per block) and one
     GEMM on every rank. Cost: for exact scoring, D_block is the block's parameter count, so this all-gathers n
     per-sample gradients: cheap for LoRA / small models, n x model size for full fine-tuning (use
     ``scoring="compress"`` there: D_block = k_out x k_in per weight);
  4. every rank runs the feasible set on the identical global geometry; the coefficients are broadcast from rank 0
     anyway (a solver with nondeterministic GPU kernels cannot split the ranks);
  5. each rank assembles the weighted gradient of its *own* rows (coefficients are globally normalized) and the
     gradients are all-reduced with SUM: every rank ends with the same ``.grad``.

``full_ghost`` needs token-level activations of other ranks' rows; in distributed mode it is replaced by
``reduced_ghost`` (scores only) or ``direct`` (when a Gram is needed); ``autotune`` is ignored. Collectives are per
block (about 3 per block plus 5 per step): fine for tens to hundreds of blocks.

Writing ``.grad`` by hand bypasses ``DistributedDataParallel``'s own all-reduce. Give the regularizer the *unwrapped*
module (``ddp.module``) and never call ``backward`` through the DDP wrapper; the regularizer does the all-reduce.
Helpers: :func:`broadcast_parameters` (start every rank from rank 0's weights), :func:`all_reduce_grads` (for
hand-written loops), :func:`max_parameter_divergence` (a check that ranks agree).

Test: ``.venv/bin/pytest -q tests/integrations/test_distributed.py`` (2 gloo processes on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from drpost.feasible.base import Coefficients, StepGeometry
from drpost.geometry.factors import row_gram
from drpost.geometry.kernels import _small, _uses, _work_dtype, direct_rows, reduced_scores, target_grad
from drpost.geometry.step_geometry import MergedBatch, finish_geometry, indicator

__all__ = [
    "DistributedStep",
    "all_gather_rows",
    "all_reduce_grads",
    "broadcast_parameters",
    "max_parameter_divergence",
    "resolve_process_group",
]


# --------------------------------------------------------------------------- groups and plain collectives
def resolve_process_group(process_group):
    """``"auto"`` -> the default group when torch.distributed is initialized with world size > 1, else None;
    None -> None (local steps); a ProcessGroup -> itself (None if it has a single member)."""
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != "auto":
            raise ValueError(f"option 'process_group' must be None, 'auto' or a ProcessGroup, got {process_group!r}")
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
            return None
        return dist.group.WORLD
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("option 'process_group': torch.distributed is not initialized")
    return process_group if dist.get_world_size(process_group) > 1 else None


def all_gather_rows(x: Tensor, group=None, sizes: list[int] | None = None) -> Tensor:
    """Concatenate every rank's ``x`` (k_r, ...) along dim 0, in rank order (k_r may differ).  -> (sum k_r, ...)"""
    world = dist.get_world_size(group)
    if sizes is None:
        k = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
        ks = [torch.zeros_like(k) for _ in range(world)]
        dist.all_gather(ks, k, group=group)
        sizes = [int(v) for v in ks]
    kmax = max(sizes)
    if x.shape[0] < kmax:
        x = torch.cat([x, x.new_zeros(kmax - x.shape[0], *x.shape[1:])], 0)
    outs = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(outs, x.contiguous(), group=group)
    return torch.cat([o[:s] for o, s in zip(outs, sizes)], 0)


def _flat_all_reduce(tensors: list[Tensor], group, bucket_elems: int = 1 << 25) -> list[Tensor]:
    """SUM-all-reduce a list of tensors in flat buckets (grouped by dtype); returns new tensors, same shapes."""
    out: list[Tensor | None] = [None] * len(tensors)
    by_dtype: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault((t.dtype, t.device), []).append(i)
    for idx in by_dtype.values():
        start = 0
        while start < len(idx):
            stop, n = start, 0
            while stop < len(idx) and (n == 0 or n + tensors[idx[stop]].numel() <= bucket_elems):
                n += tensors[idx[stop]].numel()
                stop += 1
            chunk = idx[start:stop]
            flat = torch.cat([tensors[i].reshape(-1) for i in chunk])
            dist.all_reduce(flat, group=group)
            off = 0
            for i in chunk:
                k = tensors[i].numel()
                out[i] = flat[off:off + k].view_as(tensors[i])
                off += k
            start = stop
    return out  # type: ignore[return-value]


def all_reduce_grads(params, group=None, op: str = "sum") -> None:
    """All-reduce ``.grad`` of ``params`` in place (``op="sum"`` or ``"mean"``); missing grads count as zeros."""
    params = [p for p in params if p.requires_grad]
    gs = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    red = _flat_all_reduce(gs, group)
    w = dist.get_world_size(group)
    for p, g in zip(params, red):
        p.grad = g / w if op == "mean" else g


@torch.no_grad()
def broadcast_parameters(model: nn.Module, src: int = 0, group=None) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (call once before training)."""
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=src, group=group)


@torch.no_grad()
def max_parameter_divergence(model: nn.Module, group=None) -> float:
    """max over parameters of |p_rank - p_rank0| (0.0 when every rank holds identical weights)."""
    worst = 0.0
    for p in model.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, src=dist.get_global_rank(group or dist.group.WORLD, 0), group=group)
        d = (p.detach() - ref).abs().max().reshape(1).double()
        dist.all_reduce(d, op=dist.ReduceOp.MAX, group=group)
        worst = max(worst, float(d))
    return worst


# --------------------------------------------------------------------------- one distributed step
@dataclass
class DistributedStep:
    """The global view of one step, built by :meth:`begin` and used by ``DataRegularizer.step``'s hooks."""

    group: object
    rank: int
    world: int
    n_sizes: list[int]  # general samples per rank
    m_sizes: list[int]  # target samples per rank
    counts: Tensor  # (n_global,) loss tokens per general sample
    target_counts: Tensor  # (m_global,)
    finite: bool  # every rank's losses are finite

    @property
    def offset(self) -> int:
        return sum(self.n_sizes[: self.rank])

    @property
    def n_local(self) -> int:
        return self.n_sizes[self.rank]

    @property
    def target_tokens(self) -> Tensor:
        return self.target_counts.sum()

    # ------------------------------------------------------------------ hook 1: counts, losses, finiteness
    @classmethod
    def begin(cls, group, loss_sums: Tensor, R_g: int, n_i: Tensor, n_t: Tensor, report) -> DistributedStep:
        """Gather counts, reduce the losses and the finiteness flag; fill the report's global loss and counts."""
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        dev = n_i.device
        sz = torch.tensor([n_i.shape[0], n_t.shape[0]], dtype=torch.long, device=dev)
        szs = [torch.zeros_like(sz) for _ in range(world)]
        dist.all_gather(szs, sz, group=group)
        n_sizes, m_sizes = [int(s[0]) for s in szs], [int(s[1]) for s in szs]
        counts = all_gather_rows(n_i, group, n_sizes)
        tcounts = all_gather_rows(n_t, group, m_sizes)
        ls = loss_sums.detach()
        fin = torch.isfinite(ls).all()
        stats = torch.stack([ls[:R_g].sum().nan_to_num(0.0, 0.0, 0.0), ls[R_g:].sum().nan_to_num(0.0, 0.0, 0.0),
                             (~fin).to(ls.dtype)]).to(torch.float64)
        dist.all_reduce(stats, group=group)
        report.counts = counts
        report.loss = float(stats[0] / counts.sum().clamp_min(1))
        report.target_loss = float(stats[1] / tcounts.sum().clamp_min(1))
        report.info["world_size"] = world
        report.info["sample_offset"] = sum(n_sizes[:rank])
        return cls(group, rank, world, n_sizes, m_sizes, counts, tcounts, bool(stats[2] == 0))

    # ------------------------------------------------------------------ hook 2: global geometry
    def geometry(self, reg, blocks, mb: MergedBatch, lr, timer, report) -> StepGeometry | None:
        """The global StepGeometry (identical on every rank); None when it is not finite (every rank skips)."""
        need_gram, need_tgram, trivial = reg.needs()
        g_ids, t_ids, R_g, merged = mb.g_ids, mb.t_ids, mb.R_g, mb.batch
        L = len(blocks)
        counts, tcounts = self.counts, self.target_counts
        dev, fdt = counts.device, counts.dtype
        n_g = sum(self.n_sizes)
        if trivial:
            z = torch.zeros(L, n_g, dtype=fdt, device=dev)
            return StepGeometry(reg.blocks, z, torch.zeros(L, dtype=fdt, device=dev), counts, tcounts, lr=lr)
        n, m = self.n_local, self.m_sizes[self.rank]
        R = merged["input_ids"].shape[0]
        T = merged["input_ids"].shape[1]
        n_t_local = tcounts[sum(self.m_sizes[: self.rank]): sum(self.m_sizes[: self.rank + 1])]
        tc = torch.zeros(R, dtype=fdt, device=dev)
        tc[R_g:] = 1.0 / self.target_tokens
        g, t = slice(0, R_g), slice(R_g, R)
        S_g, S_t = indicator(g_ids, n, fdt), indicator(t_ids, m, fdt)
        scores, tsq, grams, tgrams, sketches = [], [], [], [], []
        with timer("scoring"):
            for l, b in enumerate(blocks):
                meth = self._method(reg, l, b, R_g, R - R_g, T, need_gram or need_tgram)
                report.scoring[b.name] = meth
                uses = _uses(b)
                held = b.rows is not None and not uses  # per-row gradients materialized in the backward
                if not uses and not b.small and not held:  # no row touched this block's parameters: zero geometry
                    ref = tc
                else:
                    ref = uses[0].b if uses else b.rows.f if held else next(iter(b.small.values()))
                dtype = _work_dtype(ref.dtype)
                tcl = tc.to(dtype=dtype, device=ref.device)
                tct = tcl[t]
                small = _small(b, dtype)  # (R, D_small) exact
                Sg, St = S_g.to(dtype=dtype, device=ref.device), S_t.to(dtype=dtype, device=ref.device)
                if meth in ("direct", "compress"):
                    rows = direct_rows(b, dtype) if meth == "direct" else reg.sketcher.sketch_rows(l, b, dtype)
                    parts = [x for x in (small, rows) if x is not None]
                    F = torch.cat(parts, 1) if parts else tc.new_zeros(R, 1, dtype=dtype)  # (R, D)
                    gT = tct @ F[t]  # (D,) this rank's part of g_T
                    dist.all_reduce(gT, group=self.group)
                    scores.append(Sg @ (F[g] @ gT))  # (n,)
                    tsq.append(gT @ gT)
                    if need_gram:
                        Fs = all_gather_rows(Sg @ F[g], self.group, self.n_sizes)  # (n_global, D)
                        grams.append(row_gram(Fs))
                    if need_tgram:
                        Ft = all_gather_rows(St @ F[t], self.group, self.m_sizes)  # (m_global, D)
                        tgrams.append(row_gram(Ft))
                else:  # reduced ghost: all-reduce G_T (weight-shaped), exact scores, no Gram
                    gt = target_grad(b, tcl, t, dtype)
                    keys = list(gt)
                    parts = ([tct @ small[t]] if small is not None else []) + [gt[p] for p in keys]
                    red = _flat_all_reduce(parts, self.group)
                    gs = red[0] if small is not None else None
                    gt = dict(zip(keys, red[1 if small is not None else 0:]))
                    s = torch.zeros(R_g, dtype=dtype, device=ref.device)
                    if gt:
                        s = s + reduced_scores(b, gt, g, dtype)
                    if gs is not None:
                        s = s + small[g] @ gs
                    scores.append(Sg @ s)
                    tsq.append(sum(((v * v).sum() for v in red), torch.zeros((), dtype=dtype, device=ref.device)))
                if need_tgram:  # sketched token-mean target-sample gradients (auto strength)
                    sk = reg.sketcher.sketch_rows(l, b, dtype) if (uses or held) else None
                    tr = torch.cat([x[t] for x in (small, sk) if x is not None], 1)
                    sketches.append(all_gather_rows((St @ tr) / n_t_local.to(dtype)[:, None], self.group,
                                                    self.m_sizes))
            local = torch.stack(scores)  # (L, n)
            all_scores = all_gather_rows(local.t().contiguous(), self.group, self.n_sizes).t()  # (L, n_global)
        return finish_geometry(reg.blocks, all_scores, tsq, grams, tgrams, sketches, counts, tcounts,
                               need_gram, need_tgram, lr, report)

    @staticmethod
    def _method(reg, l, b, n_rows, m_rows, T, need_gram) -> str:
        """Scoring method of a block: compress only when asked; exact otherwise (direct when a Gram is needed,
        reduced ghost or direct for scores; full ghost becomes reduced ghost). Per-rank choices may differ
        between direct and reduced ghost: both all-reduce the same weight-layout vector."""
        if reg.scoring == "compress":
            return "compress"
        if need_gram:
            return "direct"
        meth = reg.scoring_method(l, b, n_rows, m_rows, T, need_gram)[0]
        return "direct" if meth == "direct" else "reduced_ghost"

    # ------------------------------------------------------------------ hook 3: agree on coefficients, slice
    def agree(self, coefs: Coefficients) -> Coefficients:
        """Broadcast rank 0's coefficients in place (they should already be identical)."""
        src = dist.get_global_rank(self.group, 0)
        for x in (coefs.coef, coefs.target_coef):
            dist.broadcast(x, src=src, group=self.group)
        return coefs

    def local(self, coef: Tensor) -> Tensor:
        """(L, n_global) -> this rank's (L, n_local) columns."""
        return coef[:, self.offset: self.offset + self.n_local]

    # ------------------------------------------------------------------ hook 4: sum the ranks' partial updates
    def reduce_grads(self, grads: dict, params: list[nn.Parameter]) -> dict:
        """SUM-all-reduce every parameter's partial update (zeros where a rank assembled nothing)."""
        ts = [(grads[p] if p in grads else torch.zeros(p.shape, device=p.device)).to(_work_dtype(p.dtype))
              for p in params]  # one dtype per parameter on every rank: the buckets line up
        return dict(zip(params, _flat_all_reduce(ts, self.group)))
