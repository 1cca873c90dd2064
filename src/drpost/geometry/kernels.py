"""Per-block scoring methods: scores <u_r, g_T>, Grams <u_r, u_q>, and the weighted-gradient assembly.

Rows are the merged batch's sequences: general rows ``0..R_g-1`` first, then target rows. ``g_T = sum_r tc_r u_r``
with ``tc`` the target row coefficients (1/N_T on target rows). Four methods (docs/design.md, section 2):

* ``full_ghost``: ``<G_r, G_q> = sum_{s,t} (a_rs . a_qt)(b_rs . b_qt)`` from token-pair products (no weight-sized
  tensors); uses of a tied weight stored transposed pair up as ``sum_{s,t} (b_rs . a_qt)(a_rs . b_qt)``.
* ``reduced_ghost``: form ``G_T`` once (one weight-gradient GEMM), then ``s_r = sum_t b_rt . (G_T a_rt)``. Scores only.
* ``direct``: materialize per-row gradients ``(R, *param)``; Gram = one GEMM. ``row_products`` is the same as one
  GEMM per block that ``LocalGeometry`` finishes for many blocks at once. Per-row gradients worth keeping for the
  assembly (``worth_keeping``) are built whole (``row_grads``); all others in chunks of parameter rows written into
  one reused buffer (``row_grad_chunks``, ``Workspace``), never whole.
* ``compress``: Kronecker-factored Gaussian sketch ``(P_1 B_r^T)(A_r P_2^T)`` of shape ``k_1 x k_2`` per weight
  (seeded, fixed across steps; identity where k >= the dimension); approximate but unbiased.

Small parameters (biases, norm weights, fallback modules) are always materialized per row and enter exactly. A block
that holds its weights' per-row gradients (``Block.rows``: materialized in the backward, or by ``direct`` scoring when
they are no larger than the factors) is scored from them by every exact method, and assembled from them with one GEMV
per weight (``assemble``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from drpost.geometry.factors import (
    Block,
    OneHot,
    RowGrads,
    Use,
    act_dim,
    contract,
    mm32,
    narrow,
    outer_sum,
    per_row,
    product_dtype,
    project,
    row_gram,
    rows,
    to_dtype,
    token_dots,
    work_dtype,
)

METHODS = ("full_ghost", "reduced_ghost", "direct", "compress")
GHOST_CHUNK_ELEMS = 1 << 24  # bound on the (rows x rows x T x T) intermediate of full ghost
# direct scoring keeps a block's per-row gradients for the assembly only up to this size (and only when they are
# no larger than its factors); all others come in chunks (the tied 49,152 x 576 embedding / LM head of SmolLM2 with
# 9 rows would hold ~1 GB), and the block keeps its factors for the assembly
DIRECT_MAX_BYTES = 256 * 2**20
DIRECT_CHUNK_BYTES = 16 * 2**20  # the reused buffer: chunks of a few MB up to whole blocks measured alike


@dataclass
class BlockStats:
    row_scores: Tensor  # (R_g,)  <u_r, g_T>
    target_sq: Tensor  # ()      ||g_T||^2
    row_gram: Tensor | None = None  # (R_g, R_g)
    target_row_gram: Tensor | None = None  # (R_t, R_t)
    target_row_sketch: Tensor | None = None  # (R_t, D)
    rows: RowGrads | None = None  # materialized per-row gradients worth keeping for the assembly (``direct``)


def _param_layout(g: Tensor, use: Use) -> Tensor:
    """Canonical (d_out, d_in) -> the parameter's layout."""
    return g.transpose(-1, -2) if use.transposed else g


_work_dtype = work_dtype


def _uses(block: Block) -> list[Use]:
    return [u for us in block.factored.values() for u in us]


def _small(block: Block, dtype: torch.dtype) -> Tensor | None:
    if not block.small:
        return None
    return torch.cat([g.to(dtype) for g in block.small.values()], dim=1)  # (R, D_small)


# --------------------------------------------------------------------------- full ghost
def _ghost_pair(u: Use, v: Use, x: slice, y: slice, dtype: torch.dtype) -> Tensor:
    """<G_r^u, G_q^v> (parameter layout) for r in rows x of use u, q in rows y of use v.  -> (|x|, |y|)

    The token products run in ``product_dtype`` (bf16 factors: bf16), their products and sums in ``dtype``."""
    pd = product_dtype(u.b.dtype)
    ua, ub = to_dtype(rows(u.a, x), pd), rows(u.b, x).to(pd)
    va, vb = to_dtype(rows(v.a, y), pd), rows(v.b, y).to(pd)
    if u.transposed != v.transposed:  # one stores G, the other G^T
        ua, ub = ub, ua
    R, S = ub.shape[0], ub.shape[1]
    Q, T = vb.shape[0], vb.shape[1]
    chunk = max(1, GHOST_CHUNK_ELEMS // max(1, Q * S * T))
    out = []
    for i in range(0, R, chunk):
        sl = slice(i, i + chunk)
        aa = token_dots(rows(ua, sl), va, pd).to(dtype)  # (r, Q, S, T)
        bb = token_dots(rows(ub, sl), vb, pd).to(dtype)
        out.append((aa * bb).sum(dim=(2, 3)))
    return torch.cat(out, 0)


def ghost_gram(block: Block, x: slice, y: slice, dtype: torch.dtype) -> Tensor:
    uses = _uses(block)
    # uses of *different* parameters do not interact; of the same parameter, every pair does
    total = None
    for us in block.factored.values():
        for u in us:
            for v in us:
                k = _ghost_pair(u, v, x, y, dtype)
                total = k if total is None else total + k
    del uses
    return total


# --------------------------------------------------------------------------- direct and compress
def row_grads(block: Block, dtype: torch.dtype, any_order: bool = True) -> RowGrads | None:
    """Per-row gradients of the block's factored weights, flattened side by side (``RowGrads``), or the block's own
    where it holds them in place of its uses.

    With ``any_order`` a weight's columns come in its transposed order whenever that is how its per-row gradients
    lie in memory (``factors.narrow`` computes some transposed): the same permutation for every row, so inner
    products between rows are unchanged, and no copy is made; otherwise in the parameter's layout."""
    if block.rows is not None and not _uses(block):
        rg = block.rows if any_order else RowGrads.of(block.rows.unflatten(), any_order=False)
        return rg if rg.f.dtype == dtype else RowGrads(rg.f.to(dtype), rg.spans)
    grads = []
    for p, us in block.factored.items():
        g = None
        for u in us:
            gu = _param_layout(per_row(u.b.to(dtype), to_dtype(u.a, dtype)), u)  # (R, *param) maybe a view
            g = gu if g is None else g + gu
        if g is not None:
            grads.append((p, g))
    return RowGrads.of(grads, any_order) if grads else None


def _param_rows(u: Use, lo: int, hi: int, dtype: torch.dtype, out: Tensor, accumulate: bool) -> None:
    """Write (or, ``accumulate``, add) rows ``lo:hi`` of a use's per-row gradients in the parameter's layout into
    ``out`` (R, hi - lo, other dim): one batched GEMM straight into ``out``, no temporary (any use but an embedding
    lookup stored transposed: ``_add_lookup_rows``)."""
    # parameter rows = canonical output rows (b's features), or input features for a use stored transposed; the
    # slice is taken before any cast (a 16-bit LM head's b is vocabulary-wide)
    b = u.b.to(dtype) if u.transposed else u.b[..., lo:hi].to(dtype)
    a = to_dtype(u.a[..., lo:hi] if u.transposed else u.a, dtype)
    if isinstance(a, OneHot) or narrow(hi - lo, out.shape[-1]):  # rare here: computed, then copied
        g = per_row(b, a).transpose(1, 2) if u.transposed else per_row(b, a)
        out.add_(g) if accumulate else out.copy_(g)
        return
    x, y = (a, b) if u.transposed else (b, a)
    if accumulate:  # out= rather than baddbmm_: a FLOP counter sees it
        torch.baddbmm(out, x.transpose(1, 2), y, out=out)
    else:
        torch.bmm(x.transpose(1, 2), y, out=out)


def _add_lookup_rows(g: Tensor, u: Use, lo: int, hi: int) -> None:
    """Add an embedding use's per-row gradients, rows ``lo:hi`` of its (vocabulary, dim) parameter, into g
    (R, hi - lo, dim) in place: only the tokens whose ids fall in the chunk, nothing vocabulary-sized."""
    r, t = torch.nonzero((u.a.ids >= lo) & (u.a.ids < hi), as_tuple=True)
    g.index_put_((r, u.a.ids[r, t] - lo), u.b[r, t].to(g.dtype), accumulate=True)


def row_grad_chunks(block: Block, dtype: torch.dtype, chunk_bytes: int, workspace: Workspace | None = None):
    """The block's per-row gradients (factored weights) in column chunks of about ``chunk_bytes`` (one parameter
    row at least), each weight cut along its first dimension: every coordinate once, so inner products between
    rows are sums over the chunks. Each chunk is written into ``workspace`` (one buffer for every chunk: a chunk
    must be consumed before the next is asked for).  Yields (R, D_chunk)."""
    workspace = Workspace() if workspace is None else workspace
    elem = dtype.itemsize
    for p, us in block.factored.items():
        if not us:
            continue
        R, width = us[0].b.shape[0], p.numel() // p.shape[0]
        lookups = [u for u in us if isinstance(u.a, OneHot) and u.transposed]  # (vocabulary, dim) embeddings
        dense = [u for u in us if u not in lookups]
        step = max(1, chunk_bytes // max(1, R * width * elem))
        for lo in range(0, p.shape[0], step):
            hi = min(p.shape[0], lo + step)
            g = workspace.take((R, hi - lo, width), dtype, us[0].b.device)
            for j, u in enumerate(dense):
                _param_rows(u, lo, hi, dtype, g, accumulate=j > 0)
            if lookups and not dense:
                g.zero_()
            for u in lookups:
                _add_lookup_rows(g, u, lo, hi)
            yield g.reshape(R, -1)


def direct_rows(block: Block, dtype: torch.dtype) -> Tensor | None:
    """Per-row gradients of the block's factored weights in the parameters' layout, flattened.  -> (R, sum numel)"""
    rg = row_grads(block, dtype, any_order=False)
    return None if rg is None else rg.f


def worth_keeping(block: Block, dtype: torch.dtype) -> bool:
    """Keep materialized per-row gradients for the assembly when they take no more memory than the captured factors
    they came from (p q <= T (p + q) per weight) and fit ``DIRECT_MAX_BYTES``: the assembly is then one GEMV over
    them instead of GEMMs over the factors' kept rows. Otherwise ``direct`` scores them chunk by chunk
    (``row_grad_chunks``) and the factors stay for the assembly."""
    uses = _uses(block)
    held = sum(u.b.numel() + (u.a.ids.numel() if isinstance(u.a, OneHot) else u.a.numel()) for u in uses)
    rows = uses[0].b.shape[0] * sum(p.numel() for p, us in block.factored.items() if us) if uses else 0  # (R, D)
    return rows <= held and rows * dtype.itemsize <= DIRECT_MAX_BYTES


class Workspace:
    """One reusable buffer for per-row gradients that are scored and dropped at once (``row_grad_chunks``).

    On CPU a fresh buffer of ~100 MB per block (SmolLM2's 1536 x 576 MLP weights, 33 rows) is faulted in and zeroed
    by the kernel on every allocation, and costs as much as the batched GEMM that fills it: measured, one thread,
    33 vs 77 GFLOP/s for the same products written into a fresh tensor vs a reused one. ``LocalGeometry`` holds one
    for a step's scoring, reused block after block, and drops it with the step."""

    def __init__(self):
        self.buf: Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
        """A contiguous ``shape`` view of the buffer (grown when too small; its contents are garbage)."""
        n = math.prod(shape)
        b = self.buf
        if b is None or b.numel() < n or b.dtype != dtype or b.device != torch.device(device):
            self.buf = b = None  # the old buffer goes before the new one is allocated
            self.buf = b = torch.empty(n, dtype=dtype, device=device)
        return b[:n].view(shape)


class Sketcher:
    """Seeded Gaussian sketch matrices per (block, parameter) dimension, fixed across steps."""

    def __init__(self, k_out: int, k_in: int, seed: int = 0):
        self.k = (k_out, k_in)
        self.seed = seed
        self.cache: dict[tuple, Tensor | None] = {}

    def matrix(self, key: tuple, dim: int, k: int, device, dtype) -> Tensor | None:
        """(k, dim) with N(0, 1/k) entries, so E[P^T P] = I; None (identity) where k >= dim."""
        ck = (key, dim, k, device, dtype)
        if ck not in self.cache:
            if k >= dim:
                self.cache[ck] = None
            else:
                gen = torch.Generator(device="cpu").manual_seed(hash((self.seed,) + key) % (2**63))
                p = torch.randn(k, dim, generator=gen, dtype=torch.float64) / k**0.5
                self.cache[ck] = p.to(device=device, dtype=dtype)
        return self.cache[ck]

    def sketch_rows(self, block_idx: int, block: Block, dtype: torch.dtype) -> Tensor | None:
        """Sketched per-row gradients of the factored weights, flattened.  -> (R, sum k_1 k_2)"""
        if block.rows is not None and not _uses(block):
            return self._sketch_held(block_idx, block, dtype)
        parts = []
        for j, (p, us) in enumerate(block.factored.items()):
            if not us:
                continue
            p1, p2 = p.shape[0], p.numel() // p.shape[0]
            dev = us[0].b.device
            m1 = self.matrix((block_idx, j, 0), p1, self.k[0], dev, dtype)
            m2 = self.matrix((block_idx, j, 1), p2, self.k[1], dev, dtype)
            s = None
            for u in us:
                a, b = to_dtype(u.a, dtype), u.b.to(dtype)
                first, second = (a, b) if u.transposed else (b, a)  # parameter rows come from `first`
                f = first if m1 is None else project(first, m1)
                sec = second if m2 is None else project(second, m2)
                if m1 is None and not isinstance(f, Tensor):  # one-hot kept as identity: expand
                    f = torch.nn.functional.one_hot(f.ids, f.dim).to(dtype)
                if m2 is None and not isinstance(sec, Tensor):
                    sec = torch.nn.functional.one_hot(sec.ids, sec.dim).to(dtype)
                su = f.transpose(1, 2) @ sec  # (R, k1, k2)
                s = su if s is None else s + su
            parts.append(s.reshape(s.shape[0], -1))
        return torch.cat(parts, 1) if parts else None

    def _sketch_held(self, block_idx: int, block: Block, dtype: torch.dtype) -> Tensor:
        """The same sketch ``P_1 G_r P_2^T`` of per-row gradients the block holds (parameter layout).  -> (R, D)"""
        parts = []
        js = {p: j for j, p in enumerate(block.factored)}
        for p, g in block.rows.unflatten():  # g: (R, p1, p2)
            g = g.to(dtype)
            m1 = self.matrix((block_idx, js[p], 0), g.shape[1], self.k[0], g.device, dtype)
            m2 = self.matrix((block_idx, js[p], 1), g.shape[2], self.k[1], g.device, dtype)
            s = g if m1 is None else m1 @ g  # (R, k1, p2)
            s = s if m2 is None else s @ m2.t()  # (R, k1, k2)
            parts.append(s.reshape(s.shape[0], -1))
        return torch.cat(parts, 1)


# --------------------------------------------------------------------------- reduced ghost
def target_grad(block: Block, tc: Tensor, t: slice, dtype: torch.dtype) -> dict[nn.Parameter, Tensor]:
    """G_T for each factored weight, parameter layout."""
    out = {}
    for p, us in block.factored.items():
        g = None
        for u in us:
            gu = _param_layout(outer_sum(rows(u.b, t).to(dtype), to_dtype(rows(u.a, t), dtype), tc[t]), u)
            g = gu if g is None else g + gu
        if g is not None:
            out[p] = g
    return out


def reduced_scores(block: Block, gt: dict[nn.Parameter, Tensor], x: slice, dtype: torch.dtype) -> Tensor | None:
    total = None
    for p, us in block.factored.items():
        if p not in gt:
            continue
        for u in us:
            m = _param_layout(gt[p], u)  # back to canonical
            s = contract(rows(u.b, x).to(dtype), to_dtype(rows(u.a, x), dtype), m)
            total = s if total is None else total + s
    return total


# --------------------------------------------------------------------------- the per-block entry point
def block_stats(
    block: Block,
    block_idx: int,
    method: str,
    tc: Tensor,  # (R,) target coefficients (0 on general rows)
    n_rows: int,  # R_g general rows
    need_gram: bool,
    need_target_gram: bool,
    sketcher: Sketcher | None = None,
    need_target_sketch: bool = False,
    workspace: Workspace | None = None,  # the buffer ``direct`` writes chunks of per-row gradients into
) -> BlockStats:
    if method not in METHODS:
        raise ValueError(f"option 'scoring' must be one of {METHODS} or 'auto', got {method!r}")
    uses = _uses(block)
    held = block.rows is not None and not uses  # per-row gradients in place of the factors (Block.rows)
    if not uses and not block.small and not held:  # parameters no row touched in this forward: zero geometry
        return _zero_stats(tc, n_rows, need_gram, need_target_gram, need_target_sketch)
    ref = uses[0].b if uses else block.rows.f if held else next(iter(block.small.values()))
    dtype = _work_dtype(ref.dtype)
    tc = tc.to(dtype=dtype, device=ref.device)
    R = tc.shape[0]
    g, t = slice(0, n_rows), slice(n_rows, R)
    tct = tc[t]
    small = _small(block, dtype)
    kept = None

    scores = torch.zeros(n_rows, dtype=dtype, device=ref.device)
    target_sq = torch.zeros((), dtype=dtype, device=ref.device)
    gram = torch.zeros(n_rows, n_rows, dtype=dtype, device=ref.device) if need_gram else None
    tgram = torch.zeros(R - n_rows, R - n_rows, dtype=dtype, device=ref.device) if need_target_gram else None

    def add_from_rows(f: Tensor) -> None:  # materialized (R, D): exact inner products
        nonlocal scores, target_sq
        ft = tct @ f[t]  # (D,)  g_T
        scores += f[g] @ ft
        target_sq += ft @ ft
        if gram is not None:
            gram.add_(row_gram(f[g]))
        if tgram is not None:
            tgram.add_(f[t] @ f[t].t())

    if small is not None:
        add_from_rows(small)

    if held:  # the rows stay for the assembly, whatever the method
        kept = block.rows
        if method == "compress":
            if sketcher is None:
                raise ValueError("compress scoring needs a sketcher")
            add_from_rows(sketcher.sketch_rows(block_idx, block, dtype))
        else:  # every exact method gives these inner products
            add_from_rows(block.rows.f.to(dtype))
    elif uses:
        if method == "direct" and worth_keeping(block, dtype):
            kept = row_grads(block, dtype)
            add_from_rows(kept.f)
        elif method == "direct":  # in chunks through one buffer; the factors stay for the assembly
            for f in row_grad_chunks(block, dtype, DIRECT_CHUNK_BYTES, workspace):
                add_from_rows(f)
        elif method == "compress":
            if sketcher is None:
                raise ValueError("compress scoring needs a sketcher")
            add_from_rows(sketcher.sketch_rows(block_idx, block, dtype))
        elif method == "full_ghost":
            k_gt = ghost_gram(block, g, t, dtype)  # (R_g, R_t)
            k_tt = ghost_gram(block, t, t, dtype)
            scores += k_gt @ tct
            target_sq += tct @ k_tt @ tct
            if gram is not None:
                gram.add_(ghost_gram(block, g, g, dtype))
            if tgram is not None:
                tgram.add_(k_tt)
        else:  # reduced_ghost
            if need_gram or need_target_gram:
                raise ValueError(
                    "scoring 'reduced_ghost' computes scores only, but this feasible set needs the Gram; "
                    "use scoring 'auto', 'full_ghost', 'direct' or 'compress'"
                )
            gt = target_grad(block, tc, t, dtype)
            scores += reduced_scores(block, gt, g, dtype)
            target_sq += sum((v * v).sum() for v in gt.values())

    sketch = None
    if need_target_sketch:
        sk = sketcher.sketch_rows(block_idx, block, dtype) if ((uses or held) and sketcher is not None) else None
        parts = [x[t] for x in (small, sk) if x is not None]
        sketch = torch.cat(parts, 1)
    return BlockStats(scores, target_sq, gram, tgram, sketch, kept)


def row_products(block: Block, n_rows: int, tc: Tensor, full: bool,
                 workspace: Workspace | None = None) -> tuple[Tensor, RowGrads | None]:
    """``direct`` scoring as one GEMM per block, for ``LocalGeometry`` to finish for all blocks at once: the inner
    products of every row's gradient (factored weights and small parameters) with each target row's (``full``: with
    every row's).  -> ((R, R_t), or (R, R) with ``full``; the per-row gradients worth keeping for the assembly)

    Per-row gradients not worth keeping are built chunk by chunk into ``workspace`` (``row_grad_chunks``).
    Scores, ``||g_T||^2`` and the Grams follow with the target coefficients ``tc`` (R,): ``P[g] tc_t``,
    ``tc_t^T P[t] tc_t``, ``P[g, g]``, ``P[t, t]``; the same inner products as ``block_stats``'s ``direct``."""
    uses = _uses(block)
    held = block.rows is not None and not uses
    ref = uses[0].b if uses else block.rows.f if held else next(iter(block.small.values()), tc)
    dtype = _work_dtype(ref.dtype)
    kept = row_grads(block, dtype) if held or (uses and worth_keeping(block, dtype)) else None
    R = tc.shape[0]
    P = None
    parts = [kept.f] if kept is not None else row_grad_chunks(block, dtype, DIRECT_CHUNK_BYTES, workspace)
    for f in itertools.chain([_small(block, dtype)], parts):  # (R, D), the chunks one at a time
        if f is not None:
            p = row_gram(f) if full else f @ f[n_rows:].t()
            P = p if P is None else P.add_(p)
    if P is None:  # parameters no row touched in this forward
        P = torch.zeros(R, R if full else R - n_rows, dtype=dtype, device=ref.device)
    return P, kept


def _zero_stats(tc: Tensor, n_rows: int, need_gram: bool, need_target_gram: bool, need_sketch: bool) -> BlockStats:
    dtype, dev, R_t = _work_dtype(tc.dtype), tc.device, tc.shape[0] - n_rows
    z = lambda *s: torch.zeros(*s, dtype=dtype, device=dev)  # noqa: E731
    return BlockStats(z(n_rows), z(()), z(n_rows, n_rows) if need_gram else None,
                      z(R_t, R_t) if need_target_gram else None, z(R_t, 1) if need_sketch else None)


# --------------------------------------------------------------------------- assembly
def _row_plan(host: Tensor) -> tuple[slice | Tensor | None, float | None]:
    """From host-side row coefficients (R,): the rows that carry weight (None = all; a slice when they are one
    contiguous run) and their common value when every kept row has the same coefficient (else None)."""
    nz = torch.nonzero(host).flatten()
    R = host.shape[0]
    if nz.numel() == R:
        keep = None
    elif nz.numel() > 0 and int(nz[-1]) - int(nz[0]) + 1 == nz.numel():
        keep = slice(int(nz[0]), int(nz[-1]) + 1)
    else:
        keep = nz
    vals = host[nz]
    uniform = float(vals[0]) if vals.numel() > 0 and bool((vals == vals[0]).all()) else None
    return keep, uniform


def _scaled_rows(b: Tensor, a, coef: Tensor, keep, uniform: float | None, dtype: torch.dtype):
    """The kept rows of (b, a) in ``dtype`` with the coefficients folded into the smaller operand, so that
    sum_r c_r B_r^T A_r = B'^T A'. A uniform coefficient scales whichever is smallest: b, a, or (returned as the
    third value) the (d_out, d_in) result. b: (R, T, d_out), a: (R, T, d_in) or one-hot, coef: (R,)."""
    if keep is not None:
        b, a, coef = b[keep], rows(a, keep), coef[keep]
    b, a = b.to(dtype), to_dtype(a, dtype)
    dense_a = isinstance(a, Tensor)
    if uniform is not None:
        sizes = {"b": b.numel(), "a": a.numel() if dense_a else None, "out": b.shape[-1] * act_dim(a)}
        best = min((k for k, v in sizes.items() if v is not None), key=sizes.get)
        if best == "out":
            return b, a, uniform
        return (b * uniform, a, None) if best == "b" else (b, a * uniform, None)
    c = coef.to(dtype)[:, None, None]
    if dense_a and a.shape[-1] < b.shape[-1]:
        return b, a * c, None
    return b * c, a, None


def _runs(keep: Tensor) -> list[tuple[int, int]]:
    """Maximal runs [lo, hi) of consecutive row indices in ``keep`` (sorted, host)."""
    idx = keep.tolist()
    out, lo = [], idx[0]
    for prev, cur in zip(idx, idx[1:] + [None], strict=True):
        if cur != prev + 1:
            out.append((lo, prev + 1))
            lo = cur
    return out


def _weighted_outer(b: Tensor, a, coef: Tensor, keep, uniform: float | None, dtype: torch.dtype) -> Tensor:
    """sum_r c_r B_r^T A_r over the kept rows only (canonical layout), scaling the smallest operand.

    In float32, rows kept with one common coefficient (a subset) that are not one contiguous run are summed run by
    run into one output (views, no gathered copies: a gather of an LM head's (rows, T, vocabulary) factor writes hundreds of MB
    of fresh memory, which costs more on CPU than the GEMM's share of them).

    Dense products run in ``product_dtype`` (bf16 factors: bf16 GEMMs over the gathered kept rows, as a plain bf16
    backward's weight gradients) into a ``dtype`` (float32) result (``mm32``); an embedding lookup's scatter stays in
    ``dtype``."""
    pd = product_dtype(b.dtype) if isinstance(a, Tensor) else dtype
    # 16-bit operands: a gather of the kept rows is half the bytes and one GEMM over them runs 1.4-3.5x faster than
    # one per run (measured, bf16, SmolLM2's weights and LM head, 4 of 9 rows kept)
    if (uniform is not None and isinstance(keep, Tensor) and keep.numel() > 0 and isinstance(a, Tensor)
            and not narrow(b.shape[-1], a.shape[-1]) and pd == dtype):
        g = None
        for lo, hi in _runs(keep):
            bf = b[lo:hi].to(pd).reshape(-1, b.shape[-1])  # (run T, d_out)
            af = a[lo:hi].to(pd).reshape(-1, a.shape[-1])  # (run T, d_in)
            g = mm32(bf.t(), af, g)  # added into g with out=: a FLOP counter sees it (benchmarks count matmul FLOPs)
        return g.mul_(uniform)
    b, a, scale = _scaled_rows(b, a, coef, keep, uniform, pd)
    g = outer_sum(b, a)  # float32 from 16-bit operands
    return g.mul_(scale) if scale is not None else g


def assemble(block: Block, coef: Tensor, host_coef: Tensor | None = None) -> dict[nn.Parameter, Tensor]:
    """sum_r c_r g_r for every parameter of the block: one GEMM per use.  coef: (R,)

    Rows with a zero coefficient are skipped (a subset's GEMM runs over the subset only). ``host_coef`` is an
    optional CPU copy of ``coef`` used to plan that without a device sync; on CPU ``coef`` itself is used.
    A one-hot use stored transposed (an embedding lookup) is scattered straight into the gradient another use of the
    same weight already produced (a tied LM head's GEMM): no vocabulary-sized zeros, no extra sum."""
    if block.rows is not None:  # per-row gradients kept from scoring: one GEMV per weight
        return _with_small(block, block.rows.combine(coef), coef)
    if host_coef is None and coef.device.type == "cpu":
        host_coef = coef.detach()
    keep, uniform = _row_plan(host_coef) if host_coef is not None else (None, None)
    no_rows = isinstance(keep, Tensor) and keep.numel() == 0  # every coefficient zero: zero updates
    out: dict[nn.Parameter, Tensor] = {}
    for p, us in block.factored.items():
        g = None  # parameter layout, owned here
        for u in [] if no_rows else sorted(us, key=lambda u: isinstance(u.a, OneHot)):  # dense uses first
            dtype = _work_dtype(u.b.dtype)
            if g is not None and isinstance(u.a, OneHot) and u.transposed and g.dtype == dtype:
                b, a, scale = _scaled_rows(u.b, u.a, coef, keep, uniform, dtype)
                b = b.reshape(-1, b.shape[-1])
                g.index_add_(0, a.ids.reshape(-1), b if scale is None else b * scale)
                continue
            gu = _param_layout(_weighted_outer(u.b, u.a, coef, keep, uniform, dtype), u)
            g = gu if g is None else g.add_(gu)
        if g is None and us:
            g = torch.zeros(p.shape, dtype=_work_dtype(us[0].b.dtype), device=us[0].b.device)
        if g is not None:
            out[p] = g.reshape(p.shape)
    return _with_small(block, out, coef)


def _with_small(block: Block, out: dict[nn.Parameter, Tensor], coef: Tensor) -> dict[nn.Parameter, Tensor]:
    """Add sum_r c_r g_r of the block's small (materialized) parameters to ``out``."""
    for p, rows_ in block.small.items():
        dtype = _work_dtype(rows_.dtype)
        g = coef.to(dtype) @ rows_.to(dtype)
        out[p] = g.reshape(p.shape) if p not in out else out[p] + g.reshape(p.shape)
    return out
