"""Factored per-row gradients: ``G_r = B_r^T A_r`` for every use of a weight, and the algebra on them.

A *use* is one call of a weight during the forward pass: a Linear layer, a Hugging Face ``Conv1D``, an Embedding
lookup. Its per-row gradient is a sum of token outer products, ``G_r = sum_t b_rt a_rt^T`` (canonical shape
``(d_out, d_in)``), where ``a_rt`` is the input (activation) and ``b_rt`` the output gradient of row r at token t.
The parameter stores either ``G`` (Linear) or ``G^T`` (Conv1D, Embedding): ``transposed`` says which. Embedding
inputs are one-hot vectors, kept as token ids (``OneHot``) and never expanded.

``Use`` holds one use's factors; a ``Block`` (a unit of layer scope) holds its weights' uses, or their materialized
per-row gradients (``RowGrads``), and the per-row gradients of its small parameters. Everything a scoring method
needs is built from five operations on these factors: ``token_dots`` (pairwise token inner products), ``outer_sum``
(sum_r c_r B_r^T A_r), ``contract`` (<G_r, M> for a dense M), ``project`` (sketch ``A P^T``) and ``per_row``
(materialize G_r). ``outer_sum`` and ``per_row`` compute a narrow product (a LoRA rank's few columns) transposed
(``narrow``): same values, a much faster BLAS call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class OneHot:
    """One-hot activations stored as ids: a_rt = e_{ids[r, t]} in R^dim."""

    ids: Tensor  # (R, T) long
    dim: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.ids.shape[0], self.ids.shape[1], self.dim)

    def rows(self, idx: Tensor | slice) -> OneHot:
        return OneHot(self.ids[idx], self.dim)


Act = Tensor | OneHot  # dense (R, T, d) or one-hot ids
NARROW_COLS = 16  # see ``narrow``


def rows(x: Act, idx: Tensor | slice) -> Act:
    return x.rows(idx) if isinstance(x, OneHot) else x[idx]


def token_dots(x: Act, y: Act, dtype: torch.dtype) -> Tensor:
    """Pairwise token inner products: out[r, q, s, t] = x_rs . y_qt.  x: (R, S, d), y: (Q, T, d) -> (R, Q, S, T)."""
    if isinstance(x, OneHot) and isinstance(y, OneHot):
        return (x.ids[:, None, :, None] == y.ids[None, :, None, :]).to(dtype)
    if isinstance(x, OneHot):
        return token_dots(y, x, dtype).permute(1, 0, 3, 2)
    if isinstance(y, OneHot):
        # x_rs . e_{id_qt} = x_rs[id_qt]
        R, S, _ = x.shape
        Q, T = y.ids.shape
        g = x[:, :, y.ids.reshape(-1)]  # (R, S, Q*T)
        return g.reshape(R, S, Q, T).permute(0, 2, 1, 3)
    return torch.einsum("rsd,qtd->rqst", x, y)


def narrow(rows: int, cols: int) -> bool:
    """Whether a product with a (rows x cols) output is better computed as its transpose: a GEMM whose output has
    only a few columns (a LoRA rank) runs several times slower on CPU BLAS than its transpose (measured, one thread,
    576 x 8 or 1536 x 8 outputs: 2-6x; x 16: 1.1-1.5x; from 32 columns on both orientations run alike). Same
    products, same sums: only the layout differs."""
    return cols <= NARROW_COLS and rows > cols


def outer_sum(b: Tensor, a: Act, coef: Tensor | None = None) -> Tensor:
    """sum_r c_r B_r^T A_r in canonical (d_out, d_in) layout.  b: (R, T, d_out), a: (R, T, d_in), coef: (R,).
    Dense 16-bit operands give a float32 result (``mm32``); a one-hot scatter stays in b's dtype."""
    if coef is not None:
        b = b * coef.to(b.dtype)[:, None, None]
    d_out = b.shape[-1]
    bf = b.reshape(-1, d_out)  # (R T, d_out)
    if isinstance(a, OneHot):
        out = torch.zeros(a.dim, d_out, dtype=b.dtype, device=b.device)
        out.index_add_(0, a.ids.reshape(-1), bf)
        return out.t()
    af = a.reshape(-1, a.shape[-1])  # (R T, d_in)
    if narrow(d_out, af.shape[-1]):  # the transposed product, returned as a (d_out, d_in) view
        return mm32(af.t(), bf).t()
    return mm32(bf.t(), af)


def contract(b: Tensor, a: Act, m: Tensor) -> Tensor:
    """<G_r, M> for each row, G_r = B_r^T A_r, M canonical (d_out, d_in): sum_t b_rt . (M a_rt).  -> (R,)"""
    if isinstance(a, OneHot):
        ma = m.t()[a.ids]  # (R, T, d_out): M e_id = column id of M
    else:
        ma = a @ m.t()
    return (ma * b).sum(dim=(1, 2))


def project(a: Act, p: Tensor) -> Tensor:
    """Sketch a factor: A P^T.  a: (R, T, d), p: (k, d) -> (R, T, k)."""
    if isinstance(a, OneHot):
        return p.t()[a.ids]
    return a @ p.t()


def per_row(b: Tensor, a: Act) -> Tensor:
    """Materialized per-row gradients G_r = B_r^T A_r, canonical layout.  -> (R, d_out, d_in)"""
    if isinstance(a, OneHot):
        R, T = a.ids.shape
        out = torch.zeros(R, a.dim, b.shape[-1], dtype=b.dtype, device=b.device)
        out.scatter_add_(1, a.ids[:, :, None].expand(R, T, b.shape[-1]), b)
        return out.transpose(1, 2)
    if narrow(b.shape[-1], a.shape[-1]):  # the transposed product, returned as an (R, d_out, d_in) view
        return (a.transpose(1, 2) @ b).transpose(1, 2)
    return b.transpose(1, 2) @ a


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-row algebra runs in float32 for 16-bit factors, in their own dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def product_dtype(dtype: torch.dtype) -> torch.dtype:
    """The operand dtype of the large products over factors of ``dtype`` (ghost token products, the assembly GEMMs):
    bfloat16 factors multiply as bfloat16 (the GEMM accumulates in float32 and rounds its result once, as a plain
    bf16 backward computes its weight gradients; 2.5-3.5x the float32 rate with AMX / AVX512-BF16), their results
    summed in float32. float16 factors are cast to float32 first (a product can overflow float16's range)."""
    return dtype if dtype == torch.bfloat16 else work_dtype(dtype)


MM_CHUNK_ELEMS = 1 << 21  # float32 results of 16-bit GEMMs are written in chunks of this many elements


def mm32(x: Tensor, y: Tensor, out: Tensor | None = None) -> Tensor:
    """``x @ y`` in float32 (or added into the float32 ``out``), the GEMM in the operands' own dtype (float32 and
    float64 operands: the plain product in their dtype).  x: (m, k), y: (k, n) -> (m, n). A 16-bit result is
    converted chunk by chunk (rows or columns, whichever side is longer): converting a fresh LM-head-sized 16-bit
    result at once costs about as much as the bf16 GEMM itself (measured, SmolLM2's 576 x 49,152)."""
    if x.dtype not in (torch.bfloat16, torch.float16):  # float32 / float64: the plain product in that dtype
        return x @ y if out is None else torch.addmm(out, x, y, out=out)
    m, n = x.shape[0], y.shape[1]
    res = torch.empty(m, n, dtype=torch.float32, device=x.device) if out is None else out
    by_rows = m > n  # chunks along the longer side of the result: each chunk's GEMM stays wide
    step = max(1, MM_CHUNK_ELEMS // max(1, n if by_rows else m))
    for lo in range(0, m if by_rows else n, step):
        part = x[lo:lo + step] @ y if by_rows else x @ y[:, lo:lo + step]  # 16-bit
        dst = res[lo:lo + step] if by_rows else res[:, lo:lo + step]
        dst.add_(part) if out is not None else dst.copy_(part)
    return res


def row_gram(f: Tensor) -> Tensor:
    """``f f^T``, the inner products between the rows of a short, wide ``f``.  f: (R, D) -> (R, R)

    BLAS runs this product (an R x R result from a length-D reduction) far below its rate when R is not a multiple
    of the vector width: measured on one Xeon thread (AVX-512), D = 127k, R = 33 took 3.6 ms, the 33 x 32 product
    2.4 ms, a 32 x 32 2.2 ms. So the columns up to the largest multiple of 16 (of 8 below 16) come from one GEMM,
    the remaining block of rows from a small one, and its transpose fills the rest (the Gram is symmetric)."""
    R = f.shape[0]
    k = R - R % (16 if R >= 16 else 8)
    if k in (0, R):
        return f @ f.t()
    left = f @ f[:k].t()  # (R, k)
    P = torch.empty(R, R, dtype=left.dtype, device=f.device)
    P[:, :k] = left
    P[k:, k:] = f[k:] @ f[k:].t()  # (R - k, R - k)
    P[:k, k:] = left[k:].t()
    return P


def act_dim(a: Act) -> int:
    return a.dim if isinstance(a, OneHot) else int(a.shape[-1])


def to_dtype(a: Act, dtype: torch.dtype) -> Act:
    return a if isinstance(a, OneHot) else a.to(dtype)


@dataclass
class Use:
    """One call of a weight: per-row gradient G_r = B_r^T A_r (canonical), parameter layout G or G^T."""

    a: Act  # (R, T, d_in) dense or one-hot ids
    b: Tensor  # (R, T, d_out)
    transposed: bool  # parameter stores G^T (Conv1D, Embedding)


@dataclass
class RowGrads:
    """Materialized per-row gradients of a block's factored weights, flattened side by side: weight j occupies
    columns ``spans[j] = (weight, start, end, transposed)``, in the parameter's layout or, where ``transposed``, in
    the layout of its transpose (the same permutation for every row)."""

    f: Tensor  # (R, D)
    spans: list[tuple[nn.Parameter, int, int, bool]]

    @classmethod
    def of(cls, grads: list[tuple[nn.Parameter, Tensor]], any_order: bool = True) -> RowGrads:
        """From per-row gradients (R, *param) of each weight, each maybe a transposed view: flattened without a copy
        in whichever order it lies in memory (``any_order``), else in the parameter's layout."""
        parts, spans, o = [], [], 0
        for p, g in grads:
            transposed = any_order and not g.is_contiguous() and g.transpose(1, 2).is_contiguous()
            flat = (g.transpose(1, 2) if transposed else g).reshape(g.shape[0], -1)  # (R, numel)
            spans.append((p, o, o + flat.shape[1], transposed))
            o += flat.shape[1]
            parts.append(flat)
        return cls(parts[0] if len(parts) == 1 else torch.cat(parts, 1), spans)

    def unflatten(self) -> list[tuple[nn.Parameter, Tensor]]:
        """Per weight, its per-row gradients (R, *param) (a transposed view where the columns are)."""
        R = self.f.shape[0]
        return [(p, self.f[:, s:e].reshape(R, p.shape[1], p.shape[0]).transpose(1, 2) if transposed
                 else self.f[:, s:e].reshape(R, *p.shape)) for p, s, e, transposed in self.spans]

    def combine(self, coef: Tensor) -> dict[nn.Parameter, Tensor]:
        """sum_r c_r G_r per weight, in the parameter's shape (a transposed view where the columns are).  coef (R,)"""
        c = coef.to(self.f.dtype)
        out = {}
        for p, s, e, transposed in self.spans:
            g = c @ self.f[:, s:e]  # (numel,) a fresh tensor per weight
            out[p] = g.reshape(p.shape[1], p.shape[0]).t() if transposed else g.reshape(p.shape)
        return out


@dataclass
class Block:
    """A unit of layer scope: its factored weights (with their uses) and its small materialized parameters."""

    name: str
    factored: dict[nn.Parameter, list[Use]] = field(default_factory=dict)
    # small parameters: per-row gradients (R, numel) filled after the backward
    small: dict[nn.Parameter, Tensor] = field(default_factory=dict)
    params: list[nn.Parameter] = field(default_factory=list)
    # per-row gradients of the factored weights, in place of their uses (``factored`` then keeps its weights with
    # empty lists): materialized in the backward (a weight whose per-row gradients take less memory than its
    # factors, handlers.py), or by ``direct`` scoring and kept for the assembly (the factors are then released)
    rows: RowGrads | None = None

    def clear(self) -> None:
        self.factored = {p: [] for p in self.factored}
        self.small = {}
        self.rows = None
