"""The feasible-set interface: one step's geometry in, sample coefficients out.

A feasible set sees only the small per-step quantities (scores, Gram, target norm), never the model. It returns
the coefficients of the update

    d_l = sum_i coef[l, i] * u_i^l  +  target_coef[l] * g_T^l          (one row of coef per block l)

where ``u_i`` is the gradient of general sample i's *summed* token loss and ``g_T`` the token-mean gradient of the
target rows (docs/design.md, section 2). ``step.py`` turns these into per-row weights and assembles ``.grad``.
Scope ``global`` returns a single row (L = 1) that is broadcast to every block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class StepGeometry:
    """Per-block quantities of one step, in raw-gradient space.

    ``u_i`` = gradient of general sample i's summed token loss; ``g_T`` = token-mean gradient of the target rows.
    """

    block_names: list[str]
    scores: Tensor  # (L, n)   <u_i, g_T> per block
    target_sq: Tensor  # (L,)    ||g_T||^2 per block
    counts: Tensor  # (n,)     loss-token count N_i of each general sample
    target_counts: Tensor  # (m,)     loss-token count of each target sample
    gram: Tensor | None = None  # (L, n, n) <u_i, u_j>, when the set needs it
    target_gram: Tensor | None = None  # (L, m, m) <u_t, u_t'> of target samples (summed-loss grads)
    target_sketch: Tensor | None = None  # (L, m, D) sketched token-mean target-sample grads (auto strength)
    lr: float | None = None  # current learning rate (greedy selection)

    @property
    def n(self) -> int:
        return int(self.scores.shape[-1])

    @property
    def num_blocks(self) -> int:
        return int(self.scores.shape[0])

    def summed(self) -> StepGeometry:
        """Global scope: the sums over blocks (inner products of whole-model gradients)."""

        def s(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.sum(0, keepdim=True)

        sketch = None
        if self.target_sketch is not None:  # concatenating block sketches = sketch of the whole gradient
            sketch = self.target_sketch.permute(1, 0, 2).reshape(1, self.target_sketch.shape[1], -1)
        return StepGeometry(
            block_names=["global"],
            scores=s(self.scores),
            target_sq=s(self.target_sq),
            counts=self.counts,
            target_counts=self.target_counts,
            gram=s(self.gram),
            target_gram=s(self.target_gram),
            target_sketch=sketch,
            lr=self.lr,
        )


@dataclass
class Coefficients:
    """What a feasible set returns: update = sum_i coef[l,i] u_i + target_coef[l] g_T (per block l)."""

    coef: Tensor  # (L, n)  L = 1 for scope global
    target_coef: Tensor  # (L,)
    info: dict = field(default_factory=dict)  # solver iterations, KKT residual, radius used, ...


class FeasibleSet:
    """Base class. Subclasses set the class attributes and implement ``coefficients``."""

    name: str = ""
    needs_gram: bool = False
    needs_target_gram: bool = False  # auto strength
    uses_target_rows: bool = False  # the update may contain g_T (target rows get a backward weight)
    uses_general_rows: bool = True
    # block l's coefficients depend on block l's geometry alone, whatever the other blocks hold: the step may solve
    # (and assemble) a block as soon as its geometry exists (geometry/stream.py); layer-scope sets only
    separable: bool = False

    def expected_kept(self, n: int) -> float:
        """About how many of n general samples get a non-zero coefficient (the cost model's assembly estimate)."""
        return float(n)

    def __init__(self, scope: str = "global"):
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        self.scope = scope

    def __call__(self, geo: StepGeometry) -> Coefficients:
        g = geo.summed() if self.scope == "global" else geo
        return self.coefficients(g)

    def coefficients(self, geo: StepGeometry) -> Coefficients:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scope={self.scope!r})"


def check_frac(frac: float, option: str = "frac") -> float:
    if not isinstance(frac, (int, float)) or isinstance(frac, bool) or not (0.0 < float(frac) <= 1.0):
        raise ValueError(f"option {option!r} must be a number in (0, 1], got {frac!r}")
    return float(frac)


def frac_to_k(frac: float, n: int) -> int:
    """Number of samples kept by a fraction: round half up, at least 1, at most n (0.5 of 8 -> 4)."""
    return max(1, min(n, int(frac * n + 0.5)))


def ensure_finite(*tensors: Tensor | None) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


# Solver non-convergence (issue "Reliability"): a convex set whose iterative solver used its whole budget and still
# has a relative KKT / fixed-point residual above this is not trusted for the step; DataRegularizer falls back to
# full_training for that step (logged, counted in report.info["solver_fallback"]).
SOLVER_FALLBACK_RESIDUAL = 1e-3


def solver_failure(info: dict, max_iter: int | None) -> str | None:
    """Why a solve is not trusted (iteration budget exhausted with a large or non-finite residual), else None.

    A solve that stopped before ``max_iter`` met its tolerance or stalled at its best point: trusted (no host sync).
    """
    its, res = info.get("iterations"), info.get("kkt_residual")
    if max_iter is None or its is None or res is None or int(its) < max_iter:
        return None
    r = float(torch.as_tensor(res).detach().max())
    if r == r and r <= SOLVER_FALLBACK_RESIDUAL:  # r == r: not NaN
        return None
    return f"solver did not converge in {int(its)} iterations (KKT residual {r:.3g} > {SOLVER_FALLBACK_RESIDUAL:g})"


def fallback_full_training(geo: StepGeometry, reason: str) -> Coefficients:
    """full_training coefficients (coef 1/N, target 0, one global row) standing in for a failed solve."""
    import logging

    logging.getLogger("drpost.feasible").warning("%s; falling back to full_training for this step", reason)
    n = geo.n
    c = torch.full((1, n), 1.0, dtype=geo.scores.dtype, device=geo.scores.device) / geo.counts.to(geo.scores.dtype).sum()
    return Coefficients(c, torch.zeros(1, dtype=c.dtype, device=c.device),
                        {"solver_fallback": True, "solver_fallback_reason": reason})
