"""Fuzzing the subset family through ``make_feasible`` (hypothesis): random and degenerate geometry (zero, tied,
duplicated, huge and tiny scores; rank-deficient Grams). Every output is finite and feasible (a nonempty subset per
block, except that filter may drop every sample when all are negatively aligned; coefficient 1/N_S on it and 0
elsewhere; no target weight), and with equal token counts top-k and filter
align with g_T at least as well as full_training: mean of the kept scores >= mean of all scores."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drpost.feasible import make_feasible
from drpost.feasible.base import StepGeometry, frac_to_k

F64 = torch.float64


@st.composite
def geometries(draw):
    n, L, p = draw(st.integers(1, 7)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    kind = draw(st.sampled_from(["random", "zero", "ties", "duplicated", "huge", "tiny"]))
    equal = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(L, n, p, generator=g, dtype=F64)  # per-block sample gradients
    gT = torch.randn(L, p, generator=g, dtype=F64)
    if kind == "zero":
        H.zero_()
    elif kind == "ties":
        H = H[:, :1].expand(L, n, p).clone() * torch.tensor([1.0, -1.0], dtype=F64).repeat(n)[:n, None]
    elif kind == "duplicated":
        H[:, n // 2:] = H[:, :1]
    elif kind == "huge":
        H *= 1e150
    elif kind == "tiny":
        H *= 1e-150
    counts = torch.full((n,), 3.0, dtype=F64) if equal else torch.randint(1, 6, (n,), generator=g).to(F64)
    geo = StepGeometry([f"b{i}" for i in range(L)], scores=torch.einsum("lnp,lp->ln", H, gT),
                       target_sq=(gT**2).sum(-1), counts=counts, target_counts=torch.tensor([2.0], dtype=F64),
                       gram=torch.einsum("lnp,lmp->lnm", H, H), lr=draw(st.sampled_from([1e-3, 1.0])))
    return geo, equal


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometries(), st.sampled_from(["global_subset", "layerwise_subset"]), st.sampled_from(["topk", "filter",
       "greedy"]), st.floats(0.01, 1.0), st.one_of(st.none(), st.integers(1, 9)))
def test_subset_outputs_are_finite_feasible_and_no_worse(case, method, selection, frac, k):
    geo, equal = case
    fs = make_feasible(method, frac=frac, selection=selection, k=k)
    out = fs(geo)
    scoped = geo.summed() if fs.scope == "global" else geo
    assert torch.isfinite(out.coef).all() and torch.isfinite(out.target_coef).all()
    assert out.coef.shape == (scoped.num_blocks, geo.n) and (out.target_coef == 0).all()
    mask = out.coef > 0
    empty = ~mask.any(1)  # only filter may keep nothing: frac=1 drops every negatively aligned sample
    assert not empty.any() or (selection == "filter" and (scoped.scores[empty] < 0).all())
    n_s = (mask.to(F64) * geo.counts).sum(1).clamp_min(1e-300)
    assert torch.allclose(out.coef, mask.to(F64) / n_s[:, None])
    if selection != "filter":
        want = min(k, geo.n) if k is not None else frac_to_k(frac, geo.n)
        assert (mask.sum(1) == want).all()
    else:  # filter only ever drops negatively aligned samples
        assert mask[scoped.scores >= 0].all()
    if equal and selection in ("topk", "filter"):
        s = scoped.scores
        kept = (s * mask).sum(1) / mask.sum(1).clamp_min(1)  # an empty subset: zero update, alignment 0
        assert (kept >= s.mean(1) - 1e-12 * s.abs().amax(1).clamp_min(1e-300)).all()


@settings(max_examples=40, deadline=None, database=None)
@given(geometries())
def test_full_training_and_target_only_endpoints(case):
    geo, _ = case
    ft = make_feasible("full_training")(geo)
    assert torch.allclose(ft.coef, torch.ones_like(ft.coef) / geo.counts.sum()) and (ft.target_coef == 0).all()
    to = make_feasible("target_only")(geo)
    assert (to.coef == 0).all() and (to.target_coef == 1).all()


@pytest.mark.parametrize("method", ["global_subset", "layerwise_subset"])
def test_greedy_needs_a_learning_rate(method):
    geo = StepGeometry(["b"], torch.ones(1, 3, dtype=F64), torch.ones(1, dtype=F64), torch.ones(3, dtype=F64),
                       torch.ones(1, dtype=F64), gram=torch.eye(3, dtype=F64)[None])
    with pytest.raises(ValueError, match="learning rate"):
        make_feasible(method, selection="greedy")(geo)
