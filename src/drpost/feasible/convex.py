"""The convex feasible-set family (docs/design.md, section 3): Euclidean projections of g_T solved from K and s.

This module owns the ``FeasibleSet`` subclasses ``Hull``, ``CappedSimplex``, ``Cone``, ``Span``, ``Ball``,
``Halfspace`` and ``Gem`` and the name map ``CONVEX_SETS``. The numerics live in ``solvers.py``, slack in
``slack.py``, the automatic radius in ``strength.py``.

Everything is solved in atom space: a_i = c u_i with c = n / N, so the mean of the atoms,
sum_i u_i / N, is exactly the full_training gradient; with A the matrix of atoms, K_a = c^2 K and s_a = c s.
A set returns weights w on the atoms (and mu on g_T) and reports ``Coefficients(coef = c w, target_coef = mu)``,
i.e. update = sum_i coef_i u_i + target_coef g_T per block.

Common options (every class): ``scope`` ("global" | "layer"), ``slack`` (None, a number >= 0, or "auto": the
update becomes the projection onto C + ball(slack)), ``max_iter`` (iteration budget of the iterative solvers,
default 1000) and ``tol`` (relative fixed-point tolerance, default 1e-11 in float64, ~7.6e-6 in float32).
``info`` carries "iterations", "kkt_residual" (L,) and, where a radius is used, "radius" (L,) and "estimate".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from drpost.feasible.base import Coefficients, FeasibleSet, StepGeometry, check_frac, frac_to_k
from drpost.feasible.slack import apply_slack, check_radius
from drpost.feasible.solvers import solve_gem_dual, solve_ridge, solve_weight_qp
from drpost.feasible.strength import AutoStrength


def _scale(geo: StepGeometry) -> Tensor:
    """c = n / N in the geometry's dtype (integer counts divided in the default dtype would round c to float32
    even for a float64 geometry)."""
    return geo.n / geo.counts.to(device=geo.scores.device, dtype=geo.scores.dtype).sum()


def _atoms(geo: StepGeometry) -> tuple[Tensor, Tensor, Tensor]:
    """(c, s_a (L,n), K_a (L,n,n)) with s_a = c s, K_a = c^2 K, computed in the geometry's dtype."""
    if geo.gram is None:
        raise ValueError("the convex feasible sets need the Gram (geo.gram)")
    c = _scale(geo)  # atoms a_i = c u_i, with c kept in the geometry's dtype
    return c, geo.scores * c, geo.gram * (c * c)


def _full_training(geo: StepGeometry) -> Coefficients:
    """coef = 1/N for every sample, target_coef 0 (the uniform point of the atoms)."""
    L, n = geo.num_blocks, geo.n
    N = geo.counts.to(device=geo.scores.device, dtype=geo.scores.dtype).sum()
    coef = torch.ones(L, n, dtype=geo.scores.dtype, device=geo.scores.device) / N
    return Coefficients(coef, torch.zeros(L, dtype=coef.dtype, device=coef.device))


def _zeros(geo: StepGeometry) -> Tensor:
    return torch.zeros(geo.num_blocks, dtype=geo.scores.dtype, device=geo.scores.device)


class ConvexSet(FeasibleSet):
    """Shared option handling, slack and automatic strength for the convex family."""

    needs_gram = True

    def __init__(self, scope: str = "global", slack=None, max_iter: int = 1000, tol: float | None = None):
        super().__init__(scope)
        self.slack = check_radius(slack, "slack", allow_none=True)
        if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
            raise ValueError(f"option 'max_iter' must be a positive integer, got {max_iter!r}")
        if tol is not None and (
            not isinstance(tol, (int, float)) or isinstance(tol, bool) or not (0 < float(tol) < 1)
        ):
            raise ValueError(f"option 'tol' must be a number in (0, 1), got {tol!r}")
        self.max_iter = max_iter
        self.tol = None if tol is None else float(tol)
        self.auto: AutoStrength | None = AutoStrength() if self._wants_auto() else None
        self.needs_target_gram = self.auto is not None
        if self.slack is not None:
            self.uses_target_rows = True

    def _wants_auto(self) -> bool:
        return self.slack == "auto"

    @property
    def _solver_kw(self) -> dict:
        return {"max_iter": self.max_iter, "tol": self.tol}

    def coefficients(self, geo: StepGeometry) -> Coefficients:
        auto_r, auto_info = (None, {})
        if self.auto is not None:  # once per step, shared by radius="auto" and slack="auto"
            auto_r, auto_info = self.auto(geo)
        out = self.solve(geo, auto_r)
        if auto_info:
            out.info["estimate"] = auto_info["estimate"]
        if self.slack is not None:
            out = apply_slack(geo, out, auto_r if self.slack == "auto" else self.slack)
        return out

    def solve(self, geo: StepGeometry, auto_radius: Tensor | None) -> Coefficients:  # pragma: no cover
        raise NotImplementedError

    def _options(self) -> dict:
        return {}

    def __repr__(self) -> str:
        opts = {"scope": self.scope, **self._options()}
        if self.slack is not None:
            opts["slack"] = self.slack
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in opts.items())})"


class Hull(ConvexSet):
    """C = conv{a_i}:  w* = argmin_{w >= 0, sum w = 1} ||sum_i w_i a_i - g_T||^2  (= w^T K_a w - 2 s_a^T w + const).

    Special cases: n = 1 gives the single atom (= full_training); g_T inside the hull gives g_T itself. Contains
    full_training (w = 1/n). Solver: FISTA with restart and exact simplex projection.
    """

    name = "hull"

    def solve(self, geo: StepGeometry, auto_radius: Tensor | None) -> Coefficients:
        c, s_a, K_a = _atoms(geo)
        res = solve_weight_qp(K_a, s_a, "simplex", **self._solver_kw)
        return Coefficients(
            res.x * c, _zeros(geo), {"iterations": res.iterations, "kkt_residual": res.kkt_residual}
        )


class CappedSimplex(ConvexSet):
    """C = {sum_i w_i a_i : w >= 0, sum w = 1, w_i <= 1/k}, the convex hull of all k-subset means.

    w* = argmin over that set of ||sum_i w_i a_i - g_T||^2: the convex relaxation of top-k selection.
    Options: ``k`` (integer >= 1; clamped to n) or ``frac`` (in (0, 1]; k = round(frac n), at least 1); default
    frac = 0.5. Special cases: k >= n is exactly full_training (coef = 1/N, no solve); k = 1 is ``hull``.
    """

    name = "capped_simplex"

    def __init__(self, scope: str = "global", k: int | None = None, frac: float | None = None, **kw):
        super().__init__(scope, **kw)
        if k is not None and frac is not None:
            raise ValueError(f"options 'k' and 'frac' are exclusive, got k={k!r} and frac={frac!r}")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ValueError(f"option 'k' must be a positive integer, got {k!r}")
        self.k = k
        self.frac = None if k is not None else check_frac(0.5 if frac is None else frac)

    def k_for(self, n: int) -> int:
        return min(self.k, n) if self.k is not None else frac_to_k(self.frac, n)

    def solve(self, geo: StepGeometry, auto_radius: Tensor | None) -> Coefficients:
        k = self.k_for(geo.n)
        if k >= geo.n:
            out = _full_training(geo)
            out.info.update(iterations=0, kkt_residual=_zeros(geo), k=k)
            return out
        c, s_a, K_a = _atoms(geo)
        res = solve_weight_qp(K_a, s_a, "capped_simplex", k, **self._solver_kw)
        info = {"iterations": res.iterations, "kkt_residual": res.kkt_residual, "k": k}
        return Coefficients(res.x * c, _zeros(geo), info)

    def _options(self) -> dict:
        return {"k": self.k} if self.k is not None else {"frac": self.frac}


class Cone(ConvexSet):
    """C = cone{a_i}:  w* = argmin_{w >= 0} ||sum_i w_i a_i - g_T||^2  (nonnegative least squares).

    Contains full_training (w = 1/n) and 0. If every s_i <= 0 the projection is 0. With K and s from the same
    vectors the problem is bounded even for singular K. Solver: FISTA with restart, started at w = 1/n.
    """

    name = "cone"

    def solve(self, geo: StepGeometry, auto_radius: Tensor | None) -> Coefficients:
        c, s_a, K_a = _atoms(geo)
        x0 = torch.full_like(s_a, 1.0 / geo.n)
        res = solve_weight_qp(K_a, s_a, "nonneg", x0=x0, **self._solver_kw)
        return Coefficients(
            res.x * c, _zeros(geo), {"iterations": res.iterations, "kkt_residual": res.kkt_residual}
        )


class Span(ConvexSet):
    """C = span{a_i}:  w* = argmin_w ||sum_i w_i a_i - g_T||^2 + rho ||w||^2,  rho = ridge * lambda_max(K_a).

    Option ``ridge`` (number >= 0, default 1e-6): a relative ridge that bounds the weights on near-duplicate
    samples (whose differences span directions of tiny curvature); ridge = 0 is the exact least-squares
    projection (minimum-norm weights, tiny eigenvalues dropped). Direct solve by eigendecomposition (no
    iterations); "kkt_residual" is the relative residual of the normal equations.
    """

    name = "span"

    def __init__(self, scope: str = "global", ridge: float = 1e-6, **kw):
        super().__init__(scope, **kw)
        if (
            not isinstance(ridge, (int, float))
            or isinstance(ridge, bool)
            or not math.isfinite(float(ridge))
            or ridge < 0
        ):
            raise ValueError(f"option 'ridge' must be a finite number >= 0, got {ridge!r}")
        self.ridge = float(ridge)

    def solve(self, geo: StepGeometry, auto_radius: Tensor | None) -> Coefficients:
        c, s_a, K_a = _atoms(geo)
        w, res = solve_ridge(K_a, s_a, self.ridge)
        return Coefficients(w * c, _zeros(geo), {"iterations": 0, "kkt_residual": res})

    def _options(self) -> dict:
        return {"ridge": self.ridge}


class Ball(ConvexSet):
    """C = ball(mean, r):  d = argmin_{||d - mean|| <= r} ||d - g_T|| = mean + min(1, r/||g_T - mean||)(g_T - mean).

    mean = sum_i u_i / N (full_training). Option ``radius``: number >= 0 (inf allowed) or "auto" (default; the
    standard error of g_T, ``strength.AutoStrength``). Special cases: radius 0 is exactly full_training, radius
    inf is exactly target_only; g_T = mean gives target_coef 1 (the same vector) for r > 0.
    """

    name = "ball"
    uses_target_rows = True

    def __init__(self, scope: str = "global", radius="auto", **kw):
        self.radius = check_radius(radius, "radius")
        super().__init__(scope, **kw)

    def _wants_auto(self) -> bool:
        return self.radius == "auto" or self.slack == "auto"

    def solve(self, geo: StepGeometry, auto_radius: Tensor | None) -> Coefficients:
        r = auto_radius if self.radius == "auto" else self.radius
        out = apply_slack(geo, _full_training(geo), r)
        info = {"iterations": 0, "kkt_residual": _zeros(geo), "radius": out.info["slack_radius"]}
        return Coefficients(out.coef, out.target_coef, info)

    def _options(self) -> dict:
        return {"radius": self.radius}


class Halfspace(ConvexSet):
    """C = {d : <d, mean> >= 0} (A-GEM):  d = g_T if <g_T, mean> >= 0, else g_T - <g_T, mean>/||mean||^2 mean.

    mean = sum_i u_i / N. Closed form; if mean = 0 the half-space is the whole space and d = g_T.
    """

    name = "halfspace"
    uses_target_rows = True

    def solve(self, geo: StepGeometry, auto_radius: Tensor | None) -> Coefficients:
        N = geo.counts.to(device=geo.scores.device, dtype=geo.scores.dtype).sum()
        g_dot_m = geo.scores.sum(-1) / N  # (L,)
        m_sq = geo.gram.sum((-1, -2)) / (N * N)  # (L,)
        project = (g_dot_m < 0) & (m_sq > 0)
        alpha = torch.where(project, g_dot_m / torch.where(project, m_sq, torch.ones_like(m_sq)), _zeros(geo))
        coef = (-alpha / N).unsqueeze(-1).expand(geo.num_blocks, geo.n).clone()
        info = {"iterations": 0, "kkt_residual": _zeros(geo), "projected": project}
        return Coefficients(coef, torch.ones_like(alpha), info)


class Gem(ConvexSet):
    """C = {d : <d, a_i> >= 0 for every i} (GEM):  d = argmin_{d in C} ||d - g_T||^2 = g_T + sum_i v_i a_i with

        v* = argmin_{v >= 0} 1/2 v^T K_a v + s_a^T v      (the dual; FISTA with restart from v = 0).

    Special cases: every s_i >= 0 (g_T already in C) gives v = 0, d = g_T exactly. Without the original's margin
    and ridge.
    """

    name = "gem"
    uses_target_rows = True

    def solve(self, geo: StepGeometry, auto_radius: Tensor | None) -> Coefficients:
        c, s_a, K_a = _atoms(geo)
        res = solve_gem_dual(K_a, s_a, **self._solver_kw)
        info = {"iterations": res.iterations, "kkt_residual": res.kkt_residual}
        return Coefficients(res.x * c, torch.ones_like(s_a[:, 0]), info)


CONVEX_SETS: dict[str, type[FeasibleSet]] = {
    "hull": Hull,
    "capped_simplex": CappedSimplex,
    "cone": Cone,
    "span": Span,
    "ball": Ball,
    "halfspace": Halfspace,
    "gem": Gem,
}

__all__ = ["CONVEX_SETS", "ConvexSet", "Hull", "CappedSimplex", "Cone", "Span", "Ball", "Halfspace", "Gem"]
