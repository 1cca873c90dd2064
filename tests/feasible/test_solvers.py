"""Solvers of the convex family (drpost.feasible.solvers) against cvxpy/CLARABEL and closed forms, float64."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch
from tests.helpers import cvx_solve

from drpost.feasible.solvers import (
    fista_qp,
    project_capped_simplex,
    project_simplex,
    solve_gem_dual,
    solve_ridge,
    solve_weight_qp,
)

solve = cvx_solve


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # tiny ops: thread hand-offs dominate on a shared 2-core machine
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _cvx_project(v: np.ndarray, k: int) -> np.ndarray:
    x = cp.Variable(v.shape[0])
    cons = [x >= 0, cp.sum(x) == 1, x <= 1.0 / k]
    solve(cp.Problem(cp.Minimize(cp.sum_squares(x - v)), cons))
    return x.value


@pytest.mark.parametrize("n", [1, 2, 8, 32])
@pytest.mark.parametrize("L", [1, 3])
def test_capped_simplex_projection_matches_cvxpy(n, L):
    g = torch.Generator().manual_seed(10 * n + L)
    v = 2.0 * torch.randn(L, n, generator=g, dtype=torch.float64)
    v[:, : n // 2] = v[:, :1]  # ties
    for k in sorted({1, 2, max(1, n // 3), n} - ({2} if n == 1 else set())):
        w = project_capped_simplex(v, k)
        assert torch.isfinite(w).all()
        assert (w >= 0).all() and (w <= 1.0 / k + 1e-15).all()
        assert torch.allclose(w.sum(-1), torch.ones(L, dtype=w.dtype), rtol=0, atol=1e-12)
        # idempotent: a point of the set is its own projection
        assert torch.allclose(project_capped_simplex(w, k), w, rtol=0, atol=1e-13)
        for b in range(L):
            ref = _cvx_project(v[b].numpy(), k)
            ours = ((w[b].numpy() - v[b].numpy()) ** 2).sum()
            best = ((ref - v[b].numpy()) ** 2).sum()
            assert ours <= best + 1e-9 * (1 + best)
            np.testing.assert_allclose(w[b].numpy(), ref, atol=1e-5)


def test_simplex_projection_closed_forms():
    v = torch.tensor([[0.3, 0.3, 0.3, 0.3, 0.1], [5.0, 0.0, 0.0, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]],
                     dtype=torch.float64)
    w = project_simplex(v)
    expect = torch.tensor([[0.24, 0.24, 0.24, 0.24, 0.04], [1.0, 0, 0, 0, 0], [0.2] * 5], dtype=torch.float64)
    assert torch.allclose(w, expect, atol=1e-14)
    # capped at 1/2: the top two share the mass; k = n is uniform whatever v is
    capped = project_capped_simplex(v[1:2], 2)
    assert torch.allclose(capped, torch.tensor([[0.5] + [0.125] * 4], dtype=torch.float64), atol=1e-14)
    assert torch.equal(project_capped_simplex(v, 5), torch.full_like(v, 0.2))
    # huge and tiny magnitudes stay exact
    for scale in (1e-8, 1e8):
        ws = project_simplex(v * scale)
        assert torch.isfinite(ws).all() and torch.allclose(ws.sum(-1), torch.ones(3, dtype=ws.dtype))


def _instance(n, rank, L, seed, dup=False):
    """K = G G^T, s = G g from explicit vectors (rank-deficient when rank < n, near-duplicates when dup)."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(L, n, rank, generator=g, dtype=torch.float64) + 0.5
    if dup and n > 1:
        G[:, n // 2:] = G[:, : n - n // 2] + 1e-7 * torch.randn(L, n - n // 2, rank, generator=g, dtype=G.dtype)
    t = torch.randn(L, rank, generator=g, dtype=torch.float64)
    return G, t, G @ G.transpose(1, 2), (G @ t.unsqueeze(-1)).squeeze(-1)


def _cvx_weights(G, t, kind, k=None):
    n = G.shape[0]
    x = cp.Variable(n)
    cons = [x >= 0]
    if kind != "nonneg":
        cons.append(cp.sum(x) == 1)
    if kind == "capped_simplex":
        cons.append(x <= 1.0 / k)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(G.T @ x - t)), cons)
    solve(prob)
    return prob.value


CASES = [(1, 3, False), (2, 4, False), (2, 1, False), (8, 4, False), (8, 12, True), (32, 10, False), (32, 40, True)]


@pytest.mark.parametrize("n,rank,dup", CASES)
@pytest.mark.parametrize("kind", ["simplex", "capped_simplex", "nonneg"])
def test_weight_qp_matches_cvxpy(n, rank, dup, kind):
    L = 3 if n in (8, 32) else 1
    G, t, K, s = _instance(n, rank, L, seed=n * 7 + rank, dup=dup)
    k = max(1, n // 4) if kind == "capped_simplex" else None
    if kind == "capped_simplex" and k >= n:
        k = 1
    res = solve_weight_qp(K, s, kind, k, max_iter=5000)
    assert res.iterations <= 5000 and torch.isfinite(res.kkt_residual).all()
    w = res.x
    assert (w >= 0).all()
    if kind != "nonneg":
        assert torch.allclose(w.sum(-1), torch.ones(L, dtype=w.dtype), rtol=0, atol=1e-12)
    for b in range(L):
        Gb, tb = G[b].numpy(), t[b].numpy()
        ours = float(((Gb.T @ w[b].numpy() - tb) ** 2).sum())
        ref = _cvx_weights(Gb, tb, kind, k)
        assert abs(ours - ref) <= 1e-6 * max(ref, 1e-3 * float((tb**2).sum())), (ours, ref)


@pytest.mark.parametrize("n,rank,dup", CASES)
def test_gem_dual_matches_cvxpy_primal(n, rank, dup):
    L = 3 if n in (8, 32) else 1
    G, t, K, s = _instance(n, rank, L, seed=3 * n + rank, dup=dup)
    t = t - 1.5 * G.mean(1)  # make some constraints active
    s = (G @ t.unsqueeze(-1)).squeeze(-1)
    res = solve_gem_dual(K, s, max_iter=5000)
    assert (res.x >= 0).all()
    d = t + (res.x.unsqueeze(-1) * G).sum(1)  # (L, rank)
    for b in range(L):
        Gb, tb = G[b].numpy(), t[b].numpy()
        x = cp.Variable(rank)
        prob = cp.Problem(cp.Minimize(cp.sum_squares(x - tb)), [Gb @ x >= 0])
        solve(prob)
        ours = float(((d[b].numpy() - tb) ** 2).sum())
        assert abs(ours - prob.value) <= 1e-6 * max(prob.value, 1e-3 * float((tb**2).sum()))
        assert (Gb @ d[b].numpy()).min() >= -1e-6 * np.abs(Gb).max() * np.abs(tb).sum()


def test_gem_dual_is_zero_when_all_scores_nonnegative():
    G, t, K, _ = _instance(8, 5, 2, seed=1)
    s = torch.rand(2, 8, dtype=torch.float64)
    res = solve_gem_dual(K, s)
    assert torch.equal(res.x, torch.zeros_like(s)) and res.iterations <= 25


def test_degenerate_inputs():
    # zero K, zero s: stays at the start, no NaN
    for kind in ("simplex", "capped_simplex", "nonneg"):
        K = torch.zeros(2, 4, 4, dtype=torch.float64)
        res = solve_weight_qp(K, torch.zeros(2, 4, dtype=torch.float64), kind, 2)
        assert torch.isfinite(res.x).all() and torch.isfinite(res.kkt_residual).all()
    # zero K, nonzero s over the simplex: a linear program, solved at the best vertex
    s = torch.tensor([[0.1, 0.7, 0.3]], dtype=torch.float64)
    res = solve_weight_qp(torch.zeros(1, 3, 3, dtype=torch.float64), s, "simplex")
    assert torch.allclose(res.x, torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64))
    res = solve_weight_qp(torch.zeros(1, 3, 3, dtype=torch.float64), s, "capped_simplex", 2)
    assert torch.allclose(res.x, torch.tensor([[0.0, 0.5, 0.5]], dtype=torch.float64))
    # n = 1
    res = solve_weight_qp(torch.ones(3, 1, 1, dtype=torch.float64), torch.full((3, 1), -2.0, dtype=torch.float64),
                          "nonneg")
    assert torch.equal(res.x, torch.zeros(3, 1, dtype=torch.float64))
    res = solve_weight_qp(torch.ones(1, 1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64),
                          "simplex")
    assert torch.equal(res.x, torch.ones(1, 1, dtype=torch.float64))


def test_fixed_budget_runs_without_checks_and_restart_keeps_monotone_best():
    G, t, K, s = _instance(16, 6, 2, seed=5)
    res = fista_qp(K, s, "simplex", max_iter=40, check_every=0)
    assert res.iterations == 40
    start = torch.full_like(s, 1.0 / 16)
    f0 = 0.5 * (start * (K @ start.unsqueeze(-1)).squeeze(-1)).sum(-1) - (s * start).sum(-1)
    assert (res.objective <= f0 + 1e-15).all()


def test_float32_runs_and_converges_loosely():
    G, t, K, s = _instance(32, 10, 3, seed=11)
    res = solve_weight_qp(K.float(), s.float(), "simplex")
    assert res.x.dtype == torch.float32 and (res.kkt_residual < 1e-4).all()
    ref = solve_weight_qp(K, s, "simplex", max_iter=5000)
    assert torch.allclose(res.objective.double(), ref.objective, rtol=1e-4, atol=1e-4 * s.abs().max().item())


def test_ridge_solve():
    G, t, K, s = _instance(8, 5, 2, seed=2)
    w, res = solve_ridge(K, s, 0.0)  # minimum-norm least squares: projection of t onto the row space of G
    d = (w.unsqueeze(-1) * G).sum(1)
    for b in range(2):
        Gb, tb = G[b].numpy(), t[b].numpy()
        coef, *_ = np.linalg.lstsq(Gb.T, tb, rcond=None)
        np.testing.assert_allclose(d[b].numpy(), Gb.T @ coef, atol=1e-9)
    assert (res < 1e-8).all()
    w0, _ = solve_ridge(torch.zeros(1, 3, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64), 1e-6)
    assert torch.equal(w0, torch.zeros(1, 3, dtype=torch.float64))
