"""The convex feasible-set family, slack and auto strength, against exact oracles built from explicit vectors.

Every geometry is made from explicit per-block vectors (u_i = N_i h_i, target rows u_j = N_j h_j), so the
projection can be computed independently in vector space (cvxpy/CLARABEL, numpy) and compared with the update
sum_i coef_i u_i + target_coef g_T that a set returns. float64 throughout, except the dtype test.
"""

from __future__ import annotations

import math
import zlib

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers import cvx_solve

from drpost.feasible.base import Coefficients, StepGeometry
from drpost.feasible.convex import CONVEX_SETS, Ball, CappedSimplex, Cone, Gem, Halfspace, Hull, Span
from drpost.feasible.slack import WithSlack, apply_slack
from drpost.feasible.strength import AutoStrength, batch_standard_error

solve = cvx_solve
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # tiny ops: thread hand-offs dominate on a shared 2-core machine
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# ---------------------------------------------------------------------------------------------------------------
# explicit-vector geometry and vector-space oracles
# ---------------------------------------------------------------------------------------------------------------


class Case:
    """Explicit vectors of one step and the StepGeometry computed from them."""

    def __init__(self, U, counts, UT, tcounts, HT=None):
        self.U, self.counts, self.UT, self.tcounts = U, counts, UT, tcounts  # (L,n,p), (n,), (L,m,p), (m,)
        self.gT = UT.sum(1) / tcounts.to(UT.dtype).sum()  # (L, p)
        L = U.shape[0]
        self.geo = StepGeometry(
            block_names=[f"b{i}" for i in range(L)],
            scores=(U @ self.gT.unsqueeze(-1)).squeeze(-1),
            target_sq=(self.gT**2).sum(-1),
            counts=counts,
            target_counts=tcounts,
            gram=U @ U.transpose(1, 2),
            target_gram=UT @ UT.transpose(1, 2),
            target_sketch=UT / tcounts.to(UT.dtype)[None, :, None] if HT is None else HT,
        )

    def update(self, coefs: Coefficients) -> torch.Tensor:
        """Per-block update vectors (L, p); a global (L = 1) coefficient row is broadcast to every block."""
        L = self.U.shape[0]
        coef = coefs.coef.expand(L, -1)
        tc = coefs.target_coef.expand(L)
        return (coef.unsqueeze(-1) * self.U).sum(1) + tc.unsqueeze(-1) * self.gT

    def problems(self, scope: str):
        """[(atoms A (n, P), target g (P,), N)] per block (layer) or once on concatenated blocks (global)."""
        N = float(self.counts.sum())
        c = self.U.shape[1] / N
        if scope == "global":
            A = (c * self.U).permute(1, 0, 2).reshape(self.U.shape[1], -1)
            return [(A.numpy(), self.gT.reshape(-1).numpy())]
        return [((c * self.U[b]).numpy(), self.gT[b].numpy()) for b in range(self.U.shape[0])]


def make_case(n, L=1, kind="full", m=2, seed=0, p=None, dtype=F64) -> Case:
    g = torch.Generator().manual_seed(seed)
    p = p or n + 4
    counts = torch.randint(1, 20, (n,), generator=g)
    tcounts = torch.randint(1, 20, (m,), generator=g)
    mu = torch.randn(L, 1, p, generator=g, dtype=F64)
    if kind == "rank":  # token-mean gradients in a (n//3 + 1)-dimensional affine subspace: singular Gram
        r = max(1, n // 3)
        H = mu + torch.randn(L, n, r, generator=g, dtype=F64) @ torch.randn(L, r, p, generator=g, dtype=F64)
    else:
        H = mu + torch.randn(L, n, p, generator=g, dtype=F64)
    if kind == "dup" and n > 1:
        h = n // 2
        H[:, n - h:] = H[:, :h] + 1e-7 * torch.randn(L, h, p, generator=g, dtype=F64)
    HT = 0.7 * mu + 1.2 * torch.randn(L, m, p, generator=g, dtype=F64)
    U = (counts.to(F64)[None, :, None] * H).to(dtype)
    UT = (tcounts.to(F64)[None, :, None] * HT).to(dtype)
    return Case(U, counts, UT, tcounts)


def oracle(name: str, A: np.ndarray, g: np.ndarray, **opt) -> np.ndarray:
    """The projection of g onto the set, in vector space, by cvxpy (CLARABEL) or a closed form."""
    n, P = A.shape
    mean = A.mean(0)
    if name == "span":
        w, *_ = np.linalg.lstsq(A.T, g, rcond=None)
        return A.T @ w
    if name == "ball":
        r = opt["radius"]
        dist = np.linalg.norm(g - mean)
        return mean + min(1.0, r / dist) * (g - mean) if dist > 0 else g
    if name in ("hull", "capped_simplex", "cone"):
        w = cp.Variable(n)
        cons = [w >= 0]
        if name != "cone":
            cons.append(cp.sum(w) == 1)
        if name == "capped_simplex":
            cons.append(w <= 1.0 / opt["k"])
        solve(cp.Problem(cp.Minimize(cp.sum_squares(A.T @ w - g)), cons))
        return A.T @ w.value
    # constraint normals scaled to unit length and g to unit norm (the set is a cone: same projection)
    normals = mean[None] if name == "halfspace" else A
    norms = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = normals[norms[:, 0] > 0] / norms[norms[:, 0] > 0]
    gn = max(np.linalg.norm(g), 1e-300)
    d = cp.Variable(P)
    solve(cp.Problem(cp.Minimize(cp.sum_squares(d - g / gn)), [normals @ d >= 0]))
    return gn * d.value


def check_feasible(name, d, A, g, **opt):
    """d in the set (up to rounding), in vector space."""
    scale = np.abs(A).max() * (np.abs(g).sum() + np.abs(A).sum()) + 1e-300
    mean = A.mean(0)
    if name == "halfspace":
        assert mean @ d >= -1e-9 * scale
    elif name == "gem":
        assert (A @ d).min() >= -1e-7 * scale
    elif name == "ball":
        assert np.linalg.norm(d - mean) <= opt["radius"] * (1 + 1e-9) + 1e-12 * math.sqrt(scale)


def weights_feasible(name, coefs, case, k=None):
    """hull / capped / cone: the atom weights w = coef / c are in the weight set."""
    c = case.U.shape[1] / float(case.counts.sum())
    w = coefs.coef / c
    assert (w >= 0).all()
    assert torch.equal(coefs.target_coef, torch.zeros_like(coefs.target_coef))
    if name in ("hull", "capped_simplex"):
        assert torch.allclose(w.sum(-1), torch.ones_like(w[:, 0]), rtol=0, atol=1e-10)
    if name == "capped_simplex":
        assert (w <= 1.0 / k + 1e-12).all()


def build(name, scope, n, case):
    if name == "capped_simplex":
        k = max(1, min(n - 1, n // 4)) if n > 1 else 1
        return CappedSimplex(scope, k=k), {"k": k}
    if name == "ball":  # a radius half the distance to the mean of the first block (so the ball is active)
        return None, {}
    if name == "span":
        return Span(scope, ridge=0.0), {}
    return CONVEX_SETS[name](scope), {}


NKIND = [(1, "full"), (2, "full"), (8, "full"), (8, "rank"), (8, "dup"), (32, "full"), (32, "rank"), (32, "dup")]
SCOPES = [(1, "global"), (3, "layer"), (3, "global")]


@pytest.mark.parametrize("L,scope", SCOPES)
@pytest.mark.parametrize("n,kind", NKIND)
@pytest.mark.parametrize("name", sorted(CONVEX_SETS))
def test_matches_oracle(name, n, kind, L, scope):
    case = make_case(n, L, kind, seed=zlib.crc32(f"{name}{n}{kind}{L}{scope}".encode()) % 1000)
    fs, opt = build(name, scope, n, case)
    probs = case.problems(scope)
    if name == "ball":
        A, g = probs[0]
        r = 0.5 * float(np.linalg.norm(g - A.mean(0)))
        fs, opt = Ball(scope, radius=r), {"radius": r}
    coefs = fs(case.geo)
    assert coefs.coef.shape == (L if scope == "layer" else 1, n)
    assert torch.isfinite(coefs.coef).all() and torch.isfinite(coefs.target_coef).all()
    assert coefs.coef.dtype == F64
    if name in ("hull", "capped_simplex", "cone"):
        weights_feasible(name, coefs, case, opt.get("k"))
    d_all = case.update(coefs)
    ds = [d_all.reshape(-1)] if scope == "global" else list(d_all)
    for (A, g), d in zip(probs, ds):
        d = d.numpy()
        check_feasible(name, d, A, g, **opt)
        ref = oracle(name, A, g, **opt)
        f, f_ref, g_sq = ((d - g) ** 2).sum(), ((ref - g) ** 2).sum(), (g**2).sum()
        tol = 1e-6 * max(f_ref, 1e-3 * g_sq)
        if name == "span" and kind == "dup":
            # The near-duplicates' differences (1e-7 relative) span directions whose Gram eigenvalues (1e-14
            # relative) are below what a Gram-based solve can resolve: the result lies between the exact span
            # projection and the projection onto the span of the distinct samples.
            f_distinct = ((oracle("span", A[: n - n // 2], g) - g) ** 2).sum()
            assert f_ref - tol <= f <= f_distinct + tol, (f_ref, f, f_distinct)
            continue
        assert abs(f - f_ref) <= tol, (f, f_ref)
        assert np.linalg.norm(d - ref) <= 1e-3 * math.sqrt(g_sq) + 1e-12
    if name in ("hull", "capped_simplex", "cone", "gem"):
        assert isinstance(coefs.info["iterations"], int)
        assert coefs.info["kkt_residual"].shape == coefs.target_coef.shape


# ---------------------------------------------------------------------------------------------------------------
# special cases
# ---------------------------------------------------------------------------------------------------------------


def full_training(case):
    N = case.counts.to(F64).sum()
    return torch.full((case.U.shape[0], case.U.shape[1]), 1.0, dtype=F64) / N


@pytest.mark.parametrize("n", [1, 2, 8, 32])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_capped_simplex_endpoints(n, scope):
    case = make_case(n, 3, seed=n)
    L = 3 if scope == "layer" else 1
    for fs in (CappedSimplex(scope, k=n), CappedSimplex(scope, k=n + 5), CappedSimplex(scope, frac=1.0)):
        out = fs(case.geo)
        assert torch.allclose(out.coef, full_training(case)[:L], rtol=1e-14, atol=0)
        assert torch.equal(out.target_coef, torch.zeros(L, dtype=F64))
    a, b = CappedSimplex(scope, k=1)(case.geo), Hull(scope)(case.geo)
    assert torch.allclose(case.update(a), case.update(b), atol=1e-7)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_ball_endpoints_and_slack_endpoints(scope):
    case = make_case(8, 3, seed=4)
    L = 3 if scope == "layer" else 1
    out = Ball(scope, radius=0)(case.geo)
    assert torch.allclose(out.coef, full_training(case)[:L], rtol=1e-14, atol=0)
    assert torch.equal(out.target_coef, torch.zeros(L, dtype=F64))
    for fs in (Ball(scope, radius=math.inf), Hull(scope, slack=math.inf), Gem(scope, slack=math.inf)):
        out = fs(case.geo)
        assert torch.equal(out.coef, torch.zeros(L, 8, dtype=F64))
        assert torch.equal(out.target_coef, torch.ones(L, dtype=F64))
    for cls in (Hull, Cone, Span, Halfspace, Gem):
        a, b = cls(scope)(case.geo), cls(scope, slack=0.0)(case.geo)
        assert torch.equal(a.coef, b.coef) and torch.equal(a.target_coef, b.target_coef)


def test_ball_equals_full_training_with_slack():
    from drpost.feasible.subset import FullTraining

    case = make_case(8, 3, seed=5)
    for r in (0.0, 0.3, 2.0, math.inf):
        a, b = Ball("layer", radius=r)(case.geo), WithSlack(FullTraining("layer"), r)(case.geo)
        assert torch.allclose(a.coef, b.coef, atol=1e-15) and torch.allclose(a.target_coef, b.target_coef)


def test_halfspace_cases():
    case = make_case(8, 1, seed=6)
    geo = case.geo
    ft = full_training(case)
    g_dot_mean = float((geo.scores * ft).sum())
    out = Halfspace()(geo)
    if g_dot_mean >= 0:  # kept as is
        assert torch.equal(out.coef, torch.zeros(1, 8, dtype=F64)) and out.target_coef.item() == 1.0
    # flip the target: now it opposes the mean and loses exactly its component along the mean
    neg = Case(case.U, case.counts, -case.UT if g_dot_mean >= 0 else case.UT, case.tcounts)
    out = Halfspace()(neg.geo)
    d = neg.update(out)[0]
    mean = (case.U[0].sum(0) / case.counts.sum()).to(F64)
    g = neg.gT[0]
    expect = g - (g @ mean) / (mean @ mean) * mean
    assert torch.allclose(d, expect, atol=1e-12) and abs(float(d @ mean)) < 1e-10
    # aligned target: unchanged, exactly
    pos = Case(case.U, case.counts, -neg.UT, case.tcounts)
    out = Halfspace()(pos.geo)
    assert torch.equal(out.coef, torch.zeros(1, 8, dtype=F64)) and out.target_coef.item() == 1.0


def test_gem_returns_target_when_no_conflict_and_hull_contains_target():
    g = torch.Generator().manual_seed(7)
    H = torch.rand(1, 6, 5, generator=g, dtype=F64) + 0.1  # positive vectors: all inner products > 0
    counts = torch.tensor([3, 1, 4, 1, 5, 9])
    case = Case(counts.to(F64)[None, :, None] * H, counts, torch.rand(1, 2, 5, generator=g, dtype=F64),
                torch.tensor([2, 3]))
    assert (case.geo.scores > 0).all()
    out = Gem()(case.geo)
    assert torch.equal(out.coef, torch.zeros(1, 6, dtype=F64)) and out.target_coef.item() == 1.0
    # g_T inside the hull of the atoms: hull, cone and (exact) span return g_T itself
    c = 6 / counts.sum()
    atoms = c * case.U[0]
    w = torch.tensor([0.1, 0.2, 0.3, 0.1, 0.2, 0.1], dtype=F64)
    inside = Case(case.U, counts, (w @ atoms).reshape(1, 1, 5), torch.tensor([1]))
    for fs in (Hull(), Cone(), Span(ridge=0.0)):
        d = inside.update(fs(inside.geo))
        assert torch.allclose(d, inside.gT, atol=1e-6 * float(inside.gT.norm()))


def test_n_equals_one():
    case = make_case(1, 2, seed=8)
    for name, cls in CONVEX_SETS.items():
        out = cls("layer")(case.geo) if name != "ball" else cls("layer", radius=0.1)(case.geo)
        assert torch.isfinite(out.coef).all() and out.coef.shape == (2, 1)
    assert torch.allclose(Hull("layer")(case.geo).coef, full_training(case))


# ---------------------------------------------------------------------------------------------------------------
# slack
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [0.05, 0.5, 5.0])
def test_slack_matches_vector_formula(r):
    case = make_case(8, 3, kind="rank", seed=9)
    for cls, opt in ((Hull, {}), (CappedSimplex, {"k": 3}), (Cone, {}), (Gem, {})):
        p = case.update(cls("layer", **opt)(case.geo))
        gap = case.gT - p
        expect = p + (r / gap.norm(dim=-1)).clamp(max=1).unsqueeze(-1) * gap
        fs = cls("layer", slack=r, **opt)
        assert fs.uses_target_rows
        d = case.update(fs(case.geo))
        assert torch.allclose(d, expect, atol=1e-9)


def test_slack_on_subset_coefficients_and_zero_distance():
    case = make_case(8, 3, seed=10)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, :3] = mask[1, 2:7] = mask[2, [0, 7]] = True
    Ns = (mask * case.counts).sum(-1, keepdim=True).to(F64)
    subset = Coefficients(mask / Ns, torch.zeros(3, dtype=F64))  # LayerWiseSubset-style sums u_S / N_S
    p = case.update(subset)
    r = torch.tensor([0.1, 1.0, 10.0], dtype=F64)
    out = apply_slack(case.geo, subset, r)
    gap = case.gT - p
    expect = p + (r / gap.norm(dim=-1)).clamp(max=1).unsqueeze(-1) * gap
    assert torch.allclose(case.update(out), expect, atol=1e-9)
    assert torch.equal(apply_slack(case.geo, subset, 0.0).coef, subset.coef)
    # g_T already in the set (target = the full-training direction): no NaN, the same vector
    same = Case(case.U, case.counts, case.U, case.counts)
    ft = Coefficients(full_training(case), torch.zeros(3, dtype=F64))
    for rr in (0.0, 0.5, math.inf):
        out = apply_slack(same.geo, ft, rr)
        assert torch.isfinite(out.coef).all() and torch.isfinite(out.target_coef).all()
        assert torch.allclose(same.update(out), same.gT, atol=1e-10)
    with pytest.raises(ValueError, match="summed"):
        apply_slack(case.geo, Coefficients(subset.coef[:1], subset.target_coef[:1]), 0.1)


# ---------------------------------------------------------------------------------------------------------------
# automatic strength
# ---------------------------------------------------------------------------------------------------------------


def _target_geo(UT, tcounts, sketch=None):
    L, m, p = UT.shape
    u = torch.ones(L, 1, p, dtype=F64)
    return Case(u, torch.tensor([1]), UT, tcounts, HT=sketch).geo


def test_auto_strength_batch_hand_worked():
    # g_1 = (1, 0) with N_1 = 1, g_2 = (0, 1) with N_2 = 3: g_T = (1, 3)/4; spreads 1.125 and 0.125
    UT = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]], dtype=F64)
    tc = torch.tensor([1, 3])
    expect = math.sqrt((1.125 + 0.125) / 2 / 2)
    assert torch.allclose(batch_standard_error(UT @ UT.transpose(1, 2), tc), torch.tensor([expect], dtype=F64))
    geo = _target_geo(UT, tc)
    r, info = AutoStrength()(geo)
    assert info["estimate"] == "batch" and torch.allclose(r, torch.tensor([expect], dtype=F64))
    out = Ball(radius="auto")(geo)
    assert out.info["estimate"] == "batch" and torch.allclose(out.info["radius"], r)


def test_auto_strength_running_hand_worked():
    auto = AutoStrength(decay=0.5)
    xs = [(0.0, 0.0), (2.0, 0.0), (2.0, 2.0)]
    # step 1: no spread yet -> 0; step 2: ||x2 - x1|| = 2; step 3: mean_hat = (4/3, 0), e = 40/9,
    # spread_hat = (0.5 * 2 + 0.5 * 40/9) / (1 - 0.25) = 116/27
    expect = [(0.0, "none"), (2.0, "running"), (math.sqrt(116 / 27), "running")]
    for x, (r_exp, est) in zip(xs, expect):
        sk = torch.tensor([[x]], dtype=F64)  # (L=1, m=1, D=2)
        r, info = auto(_target_geo(sk, torch.tensor([4]), sketch=sk))
        assert info["estimate"] == est and abs(float(r) - r_exp) < 1e-12


def test_auto_slack_first_step_is_the_set_and_resume_is_identical():
    g = torch.Generator().manual_seed(12)
    case = make_case(8, 3, m=1, seed=12)
    a = Hull("layer", slack="auto")
    first = a(case.geo)
    plain = Hull("layer")(case.geo)
    assert first.info["estimate"] == "none" and torch.equal(first.coef, plain.coef)
    steps = [Case(case.U, case.counts, torch.randn(3, 1, 12, generator=g, dtype=F64) * 3, torch.tensor([3]))
             for _ in range(4)]
    outs = [a(s.geo) for s in steps[:2]]
    b = Hull("layer", slack="auto")
    b.auto.load_state_dict(a.auto.state_dict())
    for s in steps[2:]:
        x, y = a(s.geo), b(s.geo)
        assert x.info["estimate"] == "running" and torch.equal(x.coef, y.coef)
        assert torch.equal(x.info["slack_radius"], y.info["slack_radius"])
    assert (outs[-1].info["slack_radius"] > 0).all()


def test_auto_strength_global_scope_uses_concatenated_sketch():
    case = make_case(4, 3, m=2, seed=13)
    r_global, info = AutoStrength()(case.geo.summed())
    U = case.UT.permute(1, 0, 2).reshape(1, 2, -1)
    assert torch.allclose(r_global, batch_standard_error(U @ U.transpose(1, 2), case.tcounts))
    r_layer, _ = AutoStrength()(case.geo)
    assert r_layer.shape == (3,) and torch.allclose((r_layer**2).sum(), (r_global**2).sum())


# ---------------------------------------------------------------------------------------------------------------
# options, dtype, registry
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,msg",
    [
        (lambda: Ball(radius=-1), "option 'radius' must be >= 0 or 'auto', got -1"),
        (lambda: Ball(radius="big"), "option 'radius'"),
        (lambda: Hull(slack=-0.5), "option 'slack'"),
        (lambda: Hull(slack=float("nan")), "option 'slack'"),
        (lambda: CappedSimplex(k=0), "option 'k'"),
        (lambda: CappedSimplex(k=2.5), "option 'k'"),
        (lambda: CappedSimplex(k=2, frac=0.5), "'k' and 'frac'"),
        (lambda: CappedSimplex(frac=1.5), "option 'frac'"),
        (lambda: Span(ridge=-1.0), "option 'ridge'"),
        (lambda: Gem(max_iter=0), "option 'max_iter'"),
        (lambda: Cone(tol=2.0), "option 'tol'"),
        (lambda: Hull(scope="block"), "scope"),
    ],
)
def test_option_validation(make, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        make()


def test_flags_and_registry():
    from drpost.feasible import make_feasible

    for name, cls in CONVEX_SETS.items():
        assert cls.name == name and cls.needs_gram
    assert {n for n, c in CONVEX_SETS.items() if c.uses_target_rows} == {"ball", "halfspace", "gem"}
    assert Hull(slack=0.1).uses_target_rows and Ball(radius="auto").needs_target_gram
    assert not Ball(radius=1.0).needs_target_gram and Hull(slack="auto").needs_target_gram
    assert isinstance(make_feasible("capped_simplex", k=3, scope="layer", slack=0.1), CappedSimplex)
    assert make_feasible("ball", radius="auto").radius == "auto"
    assert make_feasible("span", ridge=0.0).ridge == 0.0


def test_float32_keeps_dtype():
    case = make_case(32, 3, kind="dup", seed=14, dtype=torch.float32)
    for name, cls in CONVEX_SETS.items():
        fs = cls("layer", radius=0.5) if name == "ball" else cls("layer")
        out = fs(case.geo)
        assert out.coef.dtype == torch.float32 and torch.isfinite(out.coef).all()


# ---------------------------------------------------------------------------------------------------------------
# degenerate inputs (hypothesis)
# ---------------------------------------------------------------------------------------------------------------

CONTAINS_FULL_TRAINING = ("hull", "capped_simplex", "cone", "span", "ball", "halfspace")


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 6),
    p=st.integers(1, 4),
    log_scale=st.integers(-6, 6),
    zero=st.booleans(),
    seed=st.integers(0, 2**16),
    name=st.sampled_from(sorted(CONVEX_SETS)),
)
def test_degenerate_inputs_are_safe(n, p, log_scale, zero, seed, name):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 5, (n,), generator=g)
    H = torch.randn(1, n, p, generator=g, dtype=F64) * 10.0**log_scale
    if zero:
        H = torch.zeros_like(H)
    UT = torch.randn(1, 1, p, generator=g, dtype=F64)
    case = Case(counts.to(F64)[None, :, None] * H, counts, UT, torch.tensor([2]))
    fs = Ball(radius=0.3) if name == "ball" else CONVEX_SETS[name]()
    out = fs(case.geo)
    assert torch.isfinite(out.coef).all() and torch.isfinite(out.target_coef).all()
    d = case.update(out)[0]
    gT = case.gT[0]
    c = n / float(counts.sum())
    if name in ("hull", "capped_simplex", "cone"):
        w = out.coef[0] / c
        assert (w >= 0).all()
        if name != "cone":
            assert abs(float(w.sum()) - 1.0) < 1e-9
    if name in CONTAINS_FULL_TRAINING:
        mean = case.U[0].sum(0) / counts.sum()
        f, f_ft = float(((d - gT) ** 2).sum()), float(((mean - gT) ** 2).sum())
        assert f <= f_ft + 1e-9 * (f_ft + float((gT**2).sum()) + float((mean**2).sum()))
    if name == "gem":
        A = c * case.U[0]
        assert float((A @ d).min()) >= -1e-7 * float(A.abs().max()) * float(d.abs().sum() + 1)
