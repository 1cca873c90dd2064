"""Streamed layer scope: score, solve and assemble a block as soon as its per-row gradients exist.

A layer-scope set whose coefficients for block ``l`` depend on block ``l``'s geometry alone (``FeasibleSet.
separable``: LayerWiseSubset) does not need the other blocks to finish a block. For a block too large to keep its
per-row gradients until the assembly (``kernels.worth_keeping``: a full-rank weight at long T, p q > T (p + q)),
the one-pass step would otherwise score it (full ghost, or direct in chunks that are dropped) and later assemble it
with a GEMM over the factors' kept rows, about the weight-gradient GEMM a second time. Streamed, the block's per-row
gradients are built whole into the step's one reused buffer (``Workspace``: one block at a time, at most
``STREAM_MAX_BYTES``), its scores read from them, the set solves the block alone, and its update is one GEMV over
the same buffer; its factors are freed at once. The update is the same sum ``sum_r c_r g_r`` (rounding aside).

Used by ``DataRegularizer`` in one process (no data parallelism), one-pass assembly, when ``.grad`` is written;
the cost model prices ``direct`` for such a block with the assembly it saves (``cost.choose``'s
``assembly_rows``). The full solve still runs over every block afterwards (for the report and the other blocks);
a streamed block's coefficients are the ones its update was built with (``override``).
"""

from __future__ import annotations

from torch import Tensor, nn

from drpost.feasible.base import Coefficients, FeasibleSet, StepGeometry
from drpost.geometry.factors import Block, OneHot, RowGrads
from drpost.geometry.kernels import Workspace, assemble, row_grad_chunks, work_dtype
from drpost.geometry.step_geometry import MergedBatch, Timer, row_coefficients

STREAM_MAX_BYTES = 256 * 2**20  # one block's whole per-row gradients in the buffer (SmolLM2's MLP, 33 rows: 117 MB)


class Streamer:
    """One step's streamed blocks: their coefficient rows and finished updates."""

    def __init__(self, feasible: FeasibleSet, mb: MergedBatch, lr: float | None, timer: Timer):
        self.feasible, self.mb, self.lr, self.timer = feasible, mb, lr, timer
        self.coef: dict[int, tuple[Tensor, Tensor]] = {}  # block -> ((n,) coef row, () target coef)
        self.grads: dict[int, dict[nn.Parameter, Tensor]] = {}  # block -> its update per parameter
        # rows an assembly GEMM would run over (cost model): the kept general rows (+ the target rows if weighted)
        self.assembly_rows = mb.R_g * feasible.expected_kept(mb.n) / mb.n + (
            mb.R - mb.R_g if feasible.uses_target_rows else 0)

    @staticmethod
    def eligible(block: Block) -> bool:
        """One factored weight with dense uses only (no embedding lookup), per-row gradients not already held, and
        whole rows within ``STREAM_MAX_BYTES``."""
        live = [(p, us) for p, us in block.factored.items() if us]
        if block.rows is not None or len(live) != 1 or any(isinstance(u.a, OneHot) for u in live[0][1]):
            return False
        p, us = live[0]
        return us[0].b.shape[0] * p.numel() * work_dtype(us[0].b.dtype).itemsize <= STREAM_MAX_BYTES

    @staticmethod
    def hold(block: Block, workspace: Workspace) -> None:
        """Build the block's per-row gradients whole into ``workspace`` and hold them in place of its factors (which
        are released: ``Block.rows``). The buffer is the next block's once this one is ``finish``-ed."""
        p, us = next((p, us) for p, us in block.factored.items() if us)
        dtype = work_dtype(us[0].b.dtype)
        (f,) = list(row_grad_chunks(block, dtype, 1 << 62, workspace))  # one chunk: the whole weight  (R, numel)
        block.rows = RowGrads(f, [(p, 0, f.shape[1], False)])
        block.factored = {q: [] for q in block.factored}

    def finish(self, l: int, block: Block, scores: Tensor, target_sq: Tensor, gram: Tensor | None) -> None:
        """Solve block ``l`` alone from its geometry (scores (n,), ||g_T||^2 (), Gram (n, n) or None) and assemble
        its update from the held rows; the block is then spent (``Block.clear``)."""
        with self.timer.within("assembly", "scoring"):
            geo = StepGeometry([block.name], scores[None], target_sq[None], self.mb.counts, self.mb.target_counts,
                               gram=None if gram is None else gram[None], lr=self.lr)
            coefs = self.feasible(geo)
            row_c = row_coefficients(coefs, self.mb, None, 1)[0]  # (R,)
            self.coef[l] = (coefs.coef[0], coefs.target_coef[0])
            self.grads[l] = assemble(block, row_c, row_c.detach().cpu())
            block.clear()

    def override(self, coefs: Coefficients) -> Coefficients:
        """The full solve's coefficients (L, n) with each streamed block's row replaced by the one its update was
        built with (equal for a separable set; this makes the report and the update agree by construction)."""
        if not self.coef:
            return coefs
        coef, tcoef = coefs.coef.clone(), coefs.target_coef.clone()
        for l, (c, t) in self.coef.items():
            coef[l], tcoef[l] = c.to(coef.dtype), t.to(tcoef.dtype)
        return Coefficients(coef, tcoef, coefs.info)
