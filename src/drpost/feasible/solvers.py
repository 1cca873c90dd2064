"""Torch-native solvers for the convex feasible sets (docs/design.md, section 3).

This module owns the numerics behind ``convex.py``: exact Euclidean projections onto the simplex and the capped
simplex, and an accelerated projected-gradient (FISTA with adaptive restart) solver for the small quadratic programs

    min_w  w^T K w - 2 s^T w        over  the simplex / the capped simplex / the nonnegative orthant,
    min_v  1/2 v^T K v + s^T v      over  v >= 0                                  (the GEM dual).

Every function is batched over a leading dimension L (one problem per block) and runs on the input's device and
dtype. There is no host synchronisation inside an iteration: the iteration budget is fixed, per-problem decisions
use ``torch.where``, and convergence is only tested every ``check_every`` iterations (one host sync each; pass
``check_every=0`` for a fully sync-free fixed budget). Setting up the step size uses one ``eigvalsh`` per call.

K may be singular (rank-deficient, near-duplicate samples), zero, or 1 x 1. The objective then has a non-unique
minimiser in w but, for K and s built from the same vectors (K = A A^T, s = A g), a unique image A^T w; the
solvers return one minimiser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# The step size is floored at RHO * max(|s|) so that a negligible K (relative to s) cannot produce huge
# gradient steps whose projection loses precision. It only binds when lambda_max(K) < RHO * max|s|.
_LIP_FLOOR_REL = 1e-2


@dataclass
class SolverResult:
    """Solution of a batch of problems."""

    x: Tensor  # (L, n)   minimiser of each problem
    iterations: int  # iterations run (the same for the whole batch)
    kkt_residual: Tensor  # (L,)   relative fixed-point residual ||x - P(x - grad/Lip)|| / max(||x||, ||P(.)||)
    objective: Tensor  # (L,)   objective value at x


def default_tol(dtype: torch.dtype) -> float:
    """Relative fixed-point tolerance: 1e-11 in float64, 64 * eps (~7.6e-6) in float32."""
    return max(1e-11, 64.0 * torch.finfo(dtype).eps)


def default_stall_tol(dtype: torch.dtype) -> float:
    """Relative objective decrease per check window below which a problem counts as stalled (1e-12 / ~1.2e-6)."""
    return max(1e-12, 10.0 * torch.finfo(dtype).eps)


# ---------------------------------------------------------------------------------------------------------------
# Exact projections
# ---------------------------------------------------------------------------------------------------------------


def project_nonneg(v: Tensor) -> Tensor:
    """argmin_{w >= 0} ||w - v||  =  max(v, 0)."""
    return v.clamp(min=0)


def project_simplex(v: Tensor) -> Tensor:
    """argmin_{w >= 0, sum w = 1} ||w - v||, along the last dimension.

    v: Tensor  # (..., n)
    """
    return project_capped_simplex(v, 1)


def _capped_sum(vs: Tensor, prefix: Tensor, t: Tensor, cap: float) -> Tensor:
    """f(t) = sum_i clamp(v_i - t, 0, cap) at each t, from sorted v and its prefix sums.

    vs: Tensor      # (B, n)     v sorted ascending
    prefix: Tensor  # (B, n+1)   [0, cumsum(vs)]
    t: Tensor       # (B, M)
    """
    n = vs.shape[-1]
    hi = torch.searchsorted(vs, t.contiguous(), right=True)  # number of v_i <= t
    cp = torch.searchsorted(vs, (t + cap).contiguous(), right=False)  # number of v_i < t + cap
    free_sum = prefix.gather(-1, cp) - prefix.gather(-1, hi)  # sum of v_i in (t, t + cap)
    n_capped = (n - cp).to(vs.dtype)  # (python float) * (int tensor) would be float32
    return cap * n_capped + free_sum - t * (cp - hi).to(vs.dtype)


def project_capped_simplex(v: Tensor, k: int) -> Tensor:
    """argmin ||w - v|| over {w >= 0, sum w = 1, w <= 1/k}, exact, along the last dimension.

    v: Tensor  # (..., n)

    The solution is w = clamp(v - tau, 0, 1/k) with tau solving f(tau) = sum_i clamp(v_i - tau, 0, 1/k) = 1.
    f is piecewise linear and nonincreasing with breakpoints v_i and v_i - 1/k; f is evaluated at all 2n breakpoints
    (sort + searchsorted, O(n log n)), the bracketing piece is located, and tau is solved on that piece in closed
    form. k = 1 is the simplex; k >= n leaves only the uniform point 1/n (returned exactly).
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    n = v.shape[-1]
    if k >= n:
        return torch.full_like(v, 1.0 / n)
    cap = 1.0 / k
    shape = v.shape
    vb = v.reshape(-1, n)
    vs, _ = torch.sort(vb, dim=-1)
    prefix = torch.cat([torch.zeros_like(vs[:, :1]), vs.cumsum(-1)], dim=-1)
    bps, _ = torch.sort(torch.cat([vs, vs - cap], dim=-1), dim=-1)  # (B, 2n)
    f_bp = _capped_sum(vs, prefix, bps, cap)
    # f(bp_1) = n * cap > 1 and f(bp_2n) = 0: tau lies in [bp_j, bp_{j+1}] with j = #{f(bp) >= 1}.
    j = (f_bp >= 1).sum(-1, keepdim=True).clamp(1, 2 * n - 1)
    lo, hi = bps.gather(-1, j - 1), bps.gather(-1, j)  # (B, 1)
    mid = 0.5 * (lo + hi)
    capped = vb >= mid + cap
    free = (vb > mid) & ~capped
    n_free = free.sum(-1, keepdim=True).to(vb.dtype)
    n_capped = capped.sum(-1, keepdim=True).to(vb.dtype)
    free_sum = torch.where(free, vb, torch.zeros_like(vb)).sum(-1, keepdim=True)
    tau = (free_sum + cap * n_capped - 1.0) / n_free.clamp(min=1)
    # A flat piece (no free coordinate) only arises when rounding put f(bp) just below 1 at its right end:
    # f = 1 on the whole piece, so any point of it is exact.
    tau = torch.where(n_free > 0, tau, mid)
    tau = torch.minimum(torch.maximum(tau, lo), hi)
    return (vb - tau).clamp(min=0.0, max=cap).reshape(shape)


def project(v: Tensor, kind: str, k: int | None = None) -> Tensor:
    """Dispatch: kind in {"simplex", "capped_simplex", "nonneg"}."""
    if kind == "simplex":
        return project_simplex(v)
    if kind == "capped_simplex":
        if k is None:
            raise ValueError("capped_simplex projection needs k")
        return project_capped_simplex(v, k)
    if kind == "nonneg":
        return project_nonneg(v)
    raise ValueError(f"unknown constraint set {kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# FISTA for convex quadratics over a set with an exact projection
# ---------------------------------------------------------------------------------------------------------------


def _matvec(K: Tensor, x: Tensor) -> Tensor:
    return (K @ x.unsqueeze(-1)).squeeze(-1)


def lipschitz(K: Tensor, s: Tensor) -> Tensor:
    """lambda_max(K) per problem (floored, see ``_LIP_FLOOR_REL``), the curvature of 1/2 x^T K x + linear.

    K: Tensor  # (L, n, n)  symmetric PSD
    s: Tensor  # (L, n)
    """
    Ks = 0.5 * (K + K.transpose(-1, -2))
    lam = torch.linalg.eigvalsh(Ks)[..., -1]
    floor = _LIP_FLOOR_REL * s.abs().amax(-1)
    tiny = torch.finfo(K.dtype).tiny
    return torch.maximum(lam, floor).clamp(min=tiny)


def fista_qp(
    K: Tensor,  # (L, n, n)  symmetric PSD
    s: Tensor,  # (L, n)
    kind: str,
    k: int | None = None,
    *,
    x0: Tensor | None = None,  # (L, n)  feasible start; default uniform 1/n (simplices) or 0 (orthant)
    max_iter: int = 1000,
    tol: float | None = None,
    check_every: int = 25,
) -> SolverResult:
    """argmin_{x in C} 1/2 x^T K x - s^T x for C = simplex / capped simplex (1/k) / nonnegative orthant.

    FISTA with step 1/lambda_max(K) and gradient-based adaptive restart (momentum is reset whenever the step
    turns against the previous displacement), batched over L. Stops early once every problem's relative
    fixed-point residual is <= tol or its objective changed by less than ``default_stall_tol`` (relative to the
    size of its terms) over the last window (tested every ``check_every`` iterations; 0 = never, run
    ``max_iter``).
    Returns the better of the final iterate and x0, so the result is never worse than the start. On the orthant
    the problem is Jacobi-preconditioned (the residual is reported in the rescaled coordinates).
    """
    if K.ndim != 3 or s.ndim != 2 or K.shape[:2] != s.shape or K.shape[-1] != s.shape[-1]:
        raise ValueError(f"expected K (L,n,n) and s (L,n), got {tuple(K.shape)} and {tuple(s.shape)}")
    tol = default_tol(K.dtype) if tol is None else tol
    L, n = s.shape
    if x0 is None:
        x0 = torch.full_like(s, 1.0 / n) if kind in ("simplex", "capped_simplex") else torch.zeros_like(s)
    if kind == "nonneg":
        # Jacobi preconditioning: the orthant is invariant under x = z / sqrt(diag K), and the rescaled K has a
        # unit diagonal. Sample gradients of very different norms (long vs short samples) otherwise make the
        # problem badly conditioned. Zero atoms keep scale 1.
        dg = torch.diagonal(K, dim1=-2, dim2=-1).clamp(min=0).sqrt()
        dg = torch.where(dg > 0, dg, torch.ones_like(dg))
        res = _fista(K / (dg.unsqueeze(-1) * dg.unsqueeze(-2)), s / dg, kind, k, x0 * dg, max_iter, tol, check_every)
        z = res.x / dg
        return SolverResult(z, res.iterations, res.kkt_residual, res.objective)
    return _fista(K, s, kind, k, x0, max_iter, tol, check_every)


def _face_solve(
    K: Tensor,  # (L, n, n)
    s: Tensor,  # (L, n)
    x: Tensor,  # (L, n)  feasible point whose active bounds define the face
    kind: str,
    k: int | None,
) -> Tensor:
    """Minimise 1/2 x^T K x - s^T x on the affine hull of x's face (bounds active at x held fixed).

    Free coordinates F (strictly between their bounds) solve the KKT system
        [K_FF  1_F] [x_F]   [s_F - K_Fb x_b]
        [1_F^T  0 ] [nu ] = [1 - sum x_b   ]        (no multiplier row on the orthant),
    by a symmetric eigendecomposition pseudo-inverse (K_FF may be singular), then steps from x towards that
    solution as far as the bounds allow. Batched via masks. -> (L, n), feasible up to rounding
    """
    L, n = s.shape
    cap = 1.0 / k if kind == "capped_simplex" else math.inf
    free = (x > 0) & (x < cap)
    freef = free.to(K.dtype)
    xb = torch.where(free, torch.zeros_like(x), x)  # the fixed coordinates' values (0 or cap)
    eye = torch.eye(n + 1, dtype=K.dtype, device=K.device).expand(L, n + 1, n + 1)
    M = torch.zeros(L, n + 1, n + 1, dtype=K.dtype, device=K.device)
    M[:, :n, :n] = K * (freef.unsqueeze(-1) * freef.unsqueeze(-2))
    rhs = torch.zeros(L, n + 1, dtype=K.dtype, device=K.device)
    rhs[:, :n] = (s - _matvec(K, xb)) * freef
    if kind == "nonneg":
        fixed_rows = torch.cat([1.0 - freef, torch.ones_like(freef[:, :1])], dim=-1)
    else:
        M[:, :n, n] = freef
        M[:, n, :n] = freef
        rhs[:, n] = 1.0 - xb.sum(-1)
        fixed_rows = torch.cat([1.0 - freef, torch.zeros_like(freef[:, :1])], dim=-1)
    M = M + eye * fixed_rows.unsqueeze(-1)  # x_i = 0 rows for the fixed coordinates (and nu = 0 on the orthant)
    lam, V = torch.linalg.eigh(M)
    cutoff = (n + 1) * torch.finfo(K.dtype).eps * lam.abs().amax(-1, keepdim=True)
    keep = lam.abs() > cutoff
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    z = (V @ ((V.transpose(-1, -2) @ rhs.unsqueeze(-1)).squeeze(-1) * inv).unsqueeze(-1)).squeeze(-1)
    z = xb + torch.where(free, z[:, :n], torch.zeros_like(x))
    # Move from x towards z as far as the bounds allow (the active-set step): the objective decreases along
    # the whole segment, and a blocked move fixes one more coordinate at its bound.
    delta = torch.where(free, z - x, torch.zeros_like(x))
    big = torch.full_like(x, math.inf)
    to_zero = torch.where(free & (delta < 0), x / (-delta).clamp(min=torch.finfo(x.dtype).tiny), big)
    to_cap = torch.where(free & (delta > 0), (cap - x) / delta.clamp(min=torch.finfo(x.dtype).tiny), big)
    alpha = torch.minimum(to_zero, to_cap).amin(-1, keepdim=True).clamp(max=1.0)
    return x + alpha * delta


def _fista(
    K: Tensor,  # (L, n, n)
    s: Tensor,  # (L, n)
    kind: str,
    k: int | None,
    x0: Tensor,  # (L, n)
    max_iter: int,
    tol: float,
    check_every: int,
) -> SolverResult:
    """The FISTA loop of ``fista_qp`` (objective, residual and result in the coordinates given).

    At every check (and at the end) the iterate's face is solved exactly (``_face_solve``); the best of these
    candidates and the iterates is returned (FISTA's own sequence is not disturbed). Once FISTA has found the
    optimal face this finishes the solve to rounding precision.
    """

    step = 1.0 / lipschitz(K, s).unsqueeze(-1)  # (L, 1)

    def grad(x: Tensor) -> Tensor:
        return _matvec(K, x) - s

    def proj(v: Tensor) -> Tensor:
        return project(v, kind, k)

    def residual(x: Tensor) -> Tensor:
        xp = proj(x - step * grad(x))
        denom = torch.maximum(x.norm(dim=-1), xp.norm(dim=-1)).clamp(min=torch.finfo(x.dtype).tiny)
        return (x - xp).norm(dim=-1) / denom

    def objective(z: Tensor) -> Tensor:
        return 0.5 * (z * _matvec(K, z)).sum(-1) - (s * z).sum(-1)

    def scale(z: Tensor) -> Tensor:  # magnitude of the objective's two terms at z
        return 0.5 * (z * _matvec(K, z)).sum(-1).abs() + (s * z).sum(-1).abs()

    def polish(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(better of x and its polished face solution, its objective, whether the polish was taken)."""
        xp = proj(_face_solve(K, s, x, kind, k))
        xp = torch.where(torch.isfinite(xp), xp, x)
        f, fp = objective(x), objective(xp)
        take = fp < f
        return torch.where(take.unsqueeze(-1), xp, x), torch.where(take, fp, f), take

    stall = default_stall_tol(K.dtype)
    x = proj(x0)
    y = x
    t = torch.ones_like(s[:, 0])
    best, f_best = x, objective(x)  # best point seen at the checks (FISTA's own sequence is left undisturbed)
    f_last = f_best
    it = 0
    while it < max_iter:
        x_new = proj(y - step * grad(y))
        restart = ((y - x_new) * (x_new - x)).sum(-1) > 0
        t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
        beta = torch.where(restart, torch.zeros_like(t), (t - 1.0) / t_new)
        t = torch.where(restart, torch.ones_like(t), t_new)
        y = x_new + beta.unsqueeze(-1) * (x_new - x)
        x = x_new
        it += 1
        if check_every and it % check_every == 0 and it < max_iter:
            cand, f_cand, _ = polish(x)
            better = f_cand < f_best
            best = torch.where(better.unsqueeze(-1), cand, best)
            f_best = torch.where(better, f_cand, f_best)
            # Done when each problem's best point is a fixed point, or FISTA has stalled: its objective changed
            # by less than ``stall`` (relative) over the last window. Stalling happens on near-duplicate
            # samples, where the residual floors at the (tiny) gradient along the duplicates' difference while
            # the objective is already optimal to that order.
            f_x = objective(x)
            stalled = (f_last - f_x).abs() <= stall * scale(x)
            f_last = f_x
            if bool(((residual(best) <= tol) | stalled).all()):  # the only host sync, every check_every its
                break

    cand, f_cand, _ = polish(x)
    better = f_cand < f_best
    x = torch.where(better.unsqueeze(-1), cand, best)
    f = torch.where(better, f_cand, f_best)
    x_start = proj(x0)
    f0 = objective(x_start)
    keep_start = (f0 < f).unsqueeze(-1)
    x = torch.where(keep_start, x_start, x)
    return SolverResult(x=x, iterations=it, kkt_residual=residual(x), objective=torch.minimum(f, f0))


def solve_weight_qp(
    K: Tensor,  # (L, n, n)
    s: Tensor,  # (L, n)
    kind: str,
    k: int | None = None,
    **kw,
) -> SolverResult:
    """argmin_{w in C} w^T K w - 2 s^T w  (= ||sum_i w_i a_i - g||^2 - ||g||^2 for K = Gram(a), s = <a, g>).

    ``objective`` in the result is w^T K w - 2 s^T w.
    """
    res = fista_qp(K, s, kind, k, **kw)  # same minimiser: the objective is twice fista_qp's
    return SolverResult(res.x, res.iterations, res.kkt_residual, 2.0 * res.objective)


def solve_gem_dual(
    K: Tensor,  # (L, n, n)  Gram of the constraint normals a_i
    s: Tensor,  # (L, n)     <a_i, g>
    **kw,
) -> SolverResult:
    """argmin_{v >= 0} 1/2 v^T K v + s^T v, the dual of  min_d ||d - g||^2  s.t.  <d, a_i> >= 0 for all i.

    The primal solution is d = g + sum_i v_i a_i. When every s_i >= 0, v = 0 (d = g) exactly.
    """
    return fista_qp(K, -s, "nonneg", x0=torch.zeros_like(s), **kw)


def solve_ridge(
    K: Tensor,  # (L, n, n)  symmetric PSD
    s: Tensor,  # (L, n)
    ridge: float,
) -> tuple[Tensor, Tensor]:
    """argmin_w w^T K w - 2 s^T w + rho ||w||^2 with rho = ridge * lambda_max(K); returns (w, relative residual).

    Solved by eigendecomposition: w = V diag(1/(lambda + rho)) V^T s, eigenvalues clipped at 0. With ridge = 0
    the pseudo-inverse is used (eigenvalues below n * eps * lambda_max are dropped): the minimum-norm solution.
    The residual is ||(K + rho I) w - s|| / max(||s||, tiny).
    """
    Ks = 0.5 * (K + K.transpose(-1, -2))
    lam, V = torch.linalg.eigh(Ks)
    lam = lam.clamp(min=0)
    lam_max = lam[..., -1:]
    rho = ridge * lam_max
    denom = lam + rho
    cutoff = K.shape[-1] * torch.finfo(K.dtype).eps * lam_max
    keep = (lam > cutoff) & (denom > 0)
    inv = torch.where(keep, 1.0 / torch.where(keep, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    coeffs = (V.transpose(-1, -2) @ s.unsqueeze(-1)).squeeze(-1) * inv
    w = (V @ coeffs.unsqueeze(-1)).squeeze(-1)
    r = _matvec(Ks, w) + rho * w - s
    res = r.norm(dim=-1) / s.norm(dim=-1).clamp(min=torch.finfo(s.dtype).tiny)
    return w, res
