"""Invariants of the data-regularized step (DESIGN.md section 2): special cases equal plain training,
one-pass equals two-pass, greedy equals a brute-force reference, bad input is refused, NaN steps are skipped."""

import copy
import math

import pytest
import torch

import drpost
from drpost.geometry.oracle import reference_geometry
from drpost.objectives import causal_lm_loss
from tests.helpers import ORACLE_RTOL, batch, tiny_model

SUBSET_METHODS = [
    dict(method="full_training"),
    dict(method="target_only"),
    dict(method="global_subset", frac=0.5),
    dict(method="global_subset", frac=0.5, selection="filter"),
    dict(method="global_subset", frac=0.5, selection="greedy"),
    dict(method="layerwise_subset", frac=0.5),
    dict(method="layerwise_subset", frac=1.0, selection="filter"),
]


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def plain_grad(model, b):
    """Standard training: token-mean loss over the batch, ordinary autograd."""
    model.zero_grad(set_to_none=True)
    loss, counts = causal_lm_loss(model, b)
    (loss.sum() / counts.sum()).backward()
    out = grads(model)
    model.zero_grad(set_to_none=True)
    return out


def dr_grad(model, gen, tgt, lr=0.1, **kw):
    model.zero_grad(set_to_none=True)
    reg = drpost.DataRegularizer(model, **kw)
    rep = reg.step(general=gen, target=tgt, loss_fn=causal_lm_loss, lr=lr)
    out = grads(model)
    model.zero_grad(set_to_none=True)
    return out, rep


def assert_same(a, b, rtol=1e-6):
    """Equal to float precision (HF RMSNorm computes in float32 even in a float64 model)."""
    assert a.keys() == b.keys()
    for k in a:
        scale = b[k].abs().max().clamp_min(1e-30)
        assert torch.allclose(a[k], b[k], rtol=rtol, atol=rtol * scale), (k, (a[k] - b[k]).abs().max() / scale)


def select_rows(b, keep):
    idx = torch.tensor(keep)
    return {k: v[idx] for k, v in b.items() if k != "sample_index"}


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def model(request):
    return tiny_model(request.param)


def test_full_training_is_plain_training(model):
    gen, tgt = batch(6, seed=1), batch(2, seed=2)
    got, _ = dr_grad(model, gen, tgt, method="full_training")
    assert_same(got, plain_grad(model, gen))


def test_target_only_is_plain_training_on_target(model):
    gen, tgt = batch(6, seed=1), batch(3, seed=2, T=6)
    got, _ = dr_grad(model, gen, tgt, method="target_only")
    assert_same(got, plain_grad(model, tgt))


@pytest.mark.parametrize("scoring", ["auto", "full_ghost", "reduced_ghost", "direct"])
def test_topk_subset_is_plain_training_on_the_subset(model, scoring):
    gen, tgt = batch(6, seed=1), batch(1, seed=2)
    got, rep = dr_grad(model, gen, tgt, method="global_subset", frac=0.5, scoring=scoring)
    ref = reference_geometry(model, gen, tgt, causal_lm_loss)
    keep = torch.topk(ref["u"] @ ref["g_T"], 3).indices.sort().values.tolist()
    assert (rep.weights[0] > 0).nonzero().flatten().tolist() == keep
    assert_same(got, plain_grad(model, select_rows(gen, keep)))


def test_multi_row_samples_are_selected_whole(model):
    gen = batch(6, seed=1, sample_index=[0, 0, 1, 2, 2, 3])  # 4 samples, two of them of two rows
    tgt = batch(1, seed=2)
    got, rep = dr_grad(model, gen, tgt, method="global_subset", frac=0.5)
    ref = reference_geometry(model, gen, tgt, causal_lm_loss)
    assert torch.allclose(rep.scores, ref["u"] @ ref["g_T"], rtol=ORACLE_RTOL)
    keep_s = torch.topk(ref["u"] @ ref["g_T"], 2).indices.tolist()
    rows = [r for r, s in enumerate([0, 0, 1, 2, 2, 3]) if s in keep_s]
    assert_same(got, plain_grad(model, select_rows(gen, rows)))


def test_global_subset_frac_one_is_full_training(model):
    gen, tgt = batch(5, seed=1), batch(1, seed=2)
    a, _ = dr_grad(model, gen, tgt, method="global_subset", frac=1.0)
    b, _ = dr_grad(model, gen, tgt, method="full_training")
    assert_same(a, b)


@pytest.mark.parametrize("kw", SUBSET_METHODS, ids=lambda k: "-".join(str(v) for v in k.values()))
def test_one_pass_equals_two_pass(model, kw):
    gen, tgt = batch(6, seed=3), batch(2, seed=4)
    a, ra = dr_grad(model, gen, tgt, assembly="one_pass", **kw)
    b, rb = dr_grad(model, gen, tgt, assembly="two_pass", **kw)
    assert torch.equal(ra.weights, rb.weights)
    assert_same(a, b)


def test_layerwise_subset_picks_per_block_topk(model):
    gen, tgt = batch(6, seed=5), batch(1, seed=6)
    _, rep = dr_grad(model, gen, tgt, method="layerwise_subset", frac=0.5)
    ref = reference_geometry(model, gen, tgt, causal_lm_loss)
    params = dict(model.named_parameters())
    names = ref["names"]
    reg = drpost.DataRegularizer(model, method="layerwise_subset")
    sizes = [params[k].numel() for k in names]
    offsets = dict(zip([id(params[k]) for k in names], torch.tensor([0] + sizes).cumsum(0).tolist()))
    assert rep.weights.shape == (len(reg.blocks), 6)
    for l, block in enumerate(reg.capture.blocks):
        cols = torch.cat([torch.arange(offsets[id(p)], offsets[id(p)] + p.numel()) for p in block.params])
        s = ref["u"][:, cols] @ ref["g_T"][cols]
        assert torch.allclose(rep.block_scores[l], s, rtol=ORACLE_RTOL, atol=ORACLE_RTOL * s.abs().max())
        assert set((rep.weights[l] > 0).nonzero().flatten().tolist()) == set(torch.topk(s, 3).indices.tolist())


def test_filter_drops_the_negative_fraction():
    model = tiny_model("llama")
    gen, tgt = batch(8, seed=7), batch(1, seed=8)
    for frac in (0.5, 1.0):
        _, rep = dr_grad(model, gen, tgt, method="global_subset", selection="filter", frac=frac)
        s = rep.scores
        neg = (s < 0).nonzero().flatten()
        n_drop = math.ceil(frac * len(neg))
        dropped = set(neg[torch.argsort(s[neg])][:n_drop].tolist())
        assert set((rep.weights[0] == 0).nonzero().flatten().tolist()) == dropped


def test_greedy_matches_brute_force_reference():
    model = tiny_model("llama")
    gen, tgt = batch(6, seed=9), batch(2, seed=10)
    lr = 3.0
    _, rep = dr_grad(model, gen, tgt, method="global_subset", selection="greedy", frac=0.5, lr=lr)
    ref = reference_geometry(model, gen, tgt, causal_lm_loss)
    u, g = ref["u"], ref["g_T"]
    picked = []
    for _ in range(3):  # brute force: the marginal gain of each candidate given the picks so far
        gains = {i: lr * (u[i] @ g) - lr**2 * sum(u[i] @ u[p] for p in picked)
                 for i in range(6) if i not in picked}
        picked.append(max(gains, key=gains.get))
    assert set((rep.weights[0] > 0).nonzero().flatten().tolist()) == set(picked)


def test_grad_accumulates_onto_existing_grad():
    model = tiny_model("llama")
    gen, tgt = batch(4, seed=1), batch(1, seed=2)
    reg = drpost.DataRegularizer(model, method="full_training")
    model.zero_grad(set_to_none=True)
    reg.step(gen, tgt, causal_lm_loss)
    once = grads(model)
    reg.step(gen, tgt, causal_lm_loss)
    twice = grads(model)
    assert_same(twice, {k: 2 * v for k, v in once.items()})
    model.zero_grad(set_to_none=True)


def test_report_fields():
    model = tiny_model("llama")
    _, rep = dr_grad(model, batch(4, seed=1), batch(1, seed=2), method="layerwise_subset", frac=0.5)
    assert not rep.skipped and rep
    assert rep.scores.shape == (4,) and rep.weights.shape[1] == 4
    assert set(rep.scoring.values()) <= {"full_ghost", "reduced_ghost", "direct"}
    assert {"forward", "backward", "scoring", "solve", "assembly"} <= set(rep.timings)
    assert math.isfinite(rep.loss) and math.isfinite(rep.target_loss)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kw, option",
    [
        (dict(method="nope"), "method"),
        (dict(method="global_subset", frac=0.0), "frac"),
        (dict(method="global_subset", frac=1.5), "frac"),
        (dict(method="layerwise_subset", frac=-1), "frac"),
        (dict(method="global_subset", scoring="ghostly"), "scoring"),
        (dict(method="global_subset", selection="best"), "selection"),
        (dict(method="global_subset", assembly="three_pass"), "assembly"),
        (dict(method="global_subset", k=0), "k"),
        (dict(method="global_subset", sketch="big"), "sketch"),
        (dict(method="full_training", frac=0.5), "frac"),
    ],
)
def test_bad_options_raise_value_error_naming_the_option(kw, option):
    with pytest.raises(ValueError, match=option):
        drpost.DataRegularizer(tiny_model("llama"), **kw)


def test_empty_target_batch_is_refused():
    model = tiny_model("llama")
    reg = drpost.DataRegularizer(model, method="global_subset")
    empty = {k: v[:0] for k, v in batch(2).items()}
    with pytest.raises(ValueError, match="target"):
        reg.step(batch(4), empty, causal_lm_loss)
    with pytest.raises(ValueError, match="target"):
        reg.step(batch(4), None, causal_lm_loss)


def test_no_trainable_parameters_is_refused():
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        drpost.DataRegularizer(model, method="global_subset")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_skips_the_step_and_touches_nothing(bad):
    model = tiny_model("llama")
    gen, tgt = batch(4, seed=1), batch(1, seed=2)
    reg = drpost.DataRegularizer(model, method="layerwise_subset")
    reg.step(gen, tgt, causal_lm_loss)  # some existing .grad
    before_g = grads(model)
    before_w = {n: p.detach().clone() for n, p in model.named_parameters()}

    def bad_loss(m, b):
        loss, counts = causal_lm_loss(m, b)
        return loss * torch.tensor([1.0, bad, 1.0, 1.0, 1.0], dtype=loss.dtype), counts

    rep = reg.step(gen, tgt, bad_loss)
    assert rep.skipped and not rep and "loss" in rep.skip_reason
    assert_same(grads(model), before_g, rtol=0)
    for n, p in model.named_parameters():
        assert torch.equal(p, before_w[n])
    # and the regularizer keeps working afterwards
    assert reg.step(gen, tgt, causal_lm_loss)


def test_float32_model_agrees_with_float64_oracle():
    m64 = tiny_model("qwen2")
    m32 = copy.deepcopy(m64).float()  # same weights, float32
    gen, tgt = batch(6, seed=1), batch(1, seed=2)
    _, rep = dr_grad(m32, gen, tgt, method="layerwise_subset", scoring="direct")
    ref = reference_geometry(m64, gen, tgt, causal_lm_loss)
    s = ref["u"] @ ref["g_T"]
    assert torch.allclose(rep.scores.double(), s, rtol=1e-4, atol=1e-5 * s.abs().max())


# ----------------------------------------------------------------------------- convex family end to end
CONVEX = [
    dict(method="hull"),
    dict(method="capped_simplex", k=2),
    dict(method="cone"),
    dict(method="span"),
    dict(method="ball", radius=0.05),
    dict(method="halfspace"),
    dict(method="gem"),
    dict(method="hull", scope="layer"),
    dict(method="global_subset", frac=0.5, slack=0.05),
    dict(method="layerwise_subset", frac=0.5, slack="auto"),
]


@pytest.mark.parametrize("kw", CONVEX, ids=lambda k: "-".join(str(v) for v in k.values()))
def test_convex_one_pass_equals_two_pass(kw):
    model = tiny_model("qwen2")
    gen, tgt = batch(6, seed=3), batch(2, seed=4)
    a, ra = dr_grad(model, gen, tgt, assembly="one_pass", **kw)
    b, rb = dr_grad(model, gen, tgt, assembly="two_pass", **kw)
    assert torch.allclose(ra.weights, rb.weights, rtol=1e-6, atol=1e-9)
    assert_same(a, b)


@pytest.mark.parametrize("method", ["hull", "gem", "cone"])
def test_filled_grad_is_the_projection_of_oracle_gradients(method):
    """The .grad the step writes equals the cvxpy projection of g_T onto C built from oracle per-sample grads."""
    cp = pytest.importorskip("cvxpy")
    model = tiny_model("llama")
    gen, tgt = batch(5, seed=11), batch(2, seed=12)
    got, rep = dr_grad(model, gen, tgt, method=method)
    ref = reference_geometry(model, gen, tgt, causal_lm_loss)
    U, g, N = ref["u"].numpy(), ref["g_T"].numpy(), float(ref["counts"].sum())
    A = U * (U.shape[0] / N)  # atoms a_i = n u_i / N
    lam = cp.Variable(A.shape[0])
    if method == "hull":
        d, cons = A.T @ lam, [lam >= 0, cp.sum(lam) == 1]
    elif method == "cone":
        d, cons = A.T @ lam, [lam >= 0]
    else:  # gem: project g onto {d : <d, a_i> >= 0}
        dv = cp.Variable(A.shape[1])
        d, cons = dv, [A @ dv >= 0]
    cp.Problem(cp.Minimize(cp.sum_squares(d - g)), cons).solve(solver=cp.CLARABEL)
    expected = torch.tensor(d.value)
    flat = torch.cat([got[k].reshape(-1) for k in ref["names"]])
    assert (flat - expected).norm() <= 1e-5 * max(expected.norm(), torch.tensor(g).norm())


@pytest.mark.parametrize("method", ["layerwise_subset", "full_training"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_step(reentrant, method):
    """Activation checkpointing re-runs forwards inside the backward; the capture must see them (full_training,
    which needs no capture, takes the captured path through a reentrant checkpoint: autograd.grad cannot)."""
    model = tiny_model("qwen2")
    gen, tgt = batch(5, seed=13), batch(1, seed=14)
    kw = {"frac": 0.5} if method == "layerwise_subset" else {}
    plain, rep_plain = dr_grad(model, gen, tgt, method=method, **kw)
    model.train()  # checkpointing is active in train mode only (dropout is 0 in these configs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    try:
        ckpt, rep_ckpt = dr_grad(model, gen, tgt, method=method, **kw)
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    assert torch.equal(rep_plain.weights, rep_ckpt.weights)
    assert_same(ckpt, plain)


def test_all_finite_sees_nan_inf_and_falls_back_on_overflow():
    """The update check: one sum per tensor; a non-finite total is checked element by element, so an overflowing
    sum of finite values is still finite, and any NaN or inf is caught."""
    from drpost.step import all_finite

    big = torch.full((4,), torch.finfo(torch.float32).max)  # finite; its sum overflows to inf
    assert all_finite([torch.ones(3), big, torch.zeros(0)])
    assert all_finite([])
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones(5)
        x[2] = bad
        assert not all_finite([torch.ones(3), x])
        assert not all_finite([big, x])
