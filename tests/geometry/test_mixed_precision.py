"""Mixed precision: the step under bf16 autocast (backward outside the region, as Hugging Face / TRL trainers run
it, or inside), with bf16 weights, and fp16 autocast with a scaled loss (what a grad scaler does), against float32.

Stated tolerance: scores and the filled ``.grad`` within 2e-2 relative of the float32 step (measured 3e-3 to 1e-2 on
these models); layer scope within 5e-2 (a block whose top-k has a near tie may keep another row in bf16). Factors are
recorded in the compute dtype; bf16 factors multiply in bf16 (ghost token products, assembly GEMMs: one rounding of
each GEMM's result, as a plain bf16 backward), and scores, Grams and the assembly sum in float32.
"""

import pytest
import torch
from tests.helpers import batch, tiny_model

import drpost
from drpost.objectives import causal_lm_loss

SCALE = 1024.0  # the loss scale of the fp16 case


def _loss(mode: str):
    def loss_fn(model, b):
        if mode in ("autocast_forward", "fp16_scaled"):
            dt = torch.float16 if mode == "fp16_scaled" else torch.bfloat16
            with torch.autocast("cpu", dtype=dt):  # the backward runs after this region closes
                loss, counts = causal_lm_loss(model, b)
            return loss * (SCALE if mode == "fp16_scaled" else 1.0), counts
        return causal_lm_loss(model, b)

    return loss_fn


def _step(family: str, method: str, mode: str, **opts):
    model = tiny_model(family, dtype=torch.float32)
    if mode == "bf16_weights":
        model = model.to(torch.bfloat16)
    gen, tgt = batch(6, seed=1, T=9), batch(2, seed=2, T=9)
    reg = drpost.DataRegularizer(model, method, **opts)
    if mode == "autocast_both":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rep = reg.step(gen, tgt, _loss(mode))
    else:
        rep = reg.step(gen, tgt, _loss(mode))
    assert rep, rep.skip_reason
    g = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).float().flatten()
                   for p in model.parameters() if p.requires_grad])
    assert all(p.grad is None or p.grad.dtype == p.dtype for p in model.parameters())
    return g / (SCALE if mode == "fp16_scaled" else 1.0), rep


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


METHODS = [("full_training", {}), ("global_subset", {"frac": 0.5}), ("layerwise_subset", {"frac": 0.5}), ("hull", {})]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["autocast_forward", "autocast_both", "bf16_weights", "fp16_scaled"])
def test_mixed_precision_step_matches_float32(family, mode):
    for method, opts in METHODS:
        ref, rep_ref = _step(family, method, "fp32", **opts)
        got, rep = _step(family, method, mode, **opts)
        tol = 5e-2 if method == "layerwise_subset" else 2e-2
        assert _rel(got, ref) <= tol, (method, _rel(got, ref))
        if rep_ref.scores is not None:
            s = rep.scores / (SCALE**2 if mode == "fp16_scaled" else 1.0)  # scores are bilinear in the loss scale
            assert _rel(s, rep_ref.scores) <= 2e-2, method
        if method == "global_subset":
            assert torch.equal(rep.weights != 0, rep_ref.weights != 0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["autocast_forward", "bf16_weights"])
def test_chunked_direct_scoring_in_bf16_matches_float32(family, mode, monkeypatch):
    """``direct`` builds per-row gradients it does not keep in chunks of parameter rows, cast to float32 chunk by
    chunk from 16-bit factors (a Linear's output slice, a GPT-2 Conv1D's input slice, the tied head's lookups):
    with one or two parameter rows per chunk the exact-Gram hull matches the float32 step as the unchunked one does."""
    from drpost.geometry import kernels

    monkeypatch.setattr(kernels, "DIRECT_CHUNK_BYTES", 64)
    ref, rep_ref = _step(family, "hull", "fp32", scoring="direct")
    got, rep = _step(family, "hull", mode, scoring="direct")
    assert set(rep.scoring.values()) == {"direct"}
    assert _rel(got, ref) <= 2e-2 and _rel(rep.scores, rep_ref.scores) <= 2e-2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method,opts", METHODS[1:], ids=[m for m, _ in METHODS[1:]])
def test_step_inside_autocast_equals_backward_outside(family, method, opts):
    """A step called inside ``torch.autocast`` runs its backward, scoring and assembly outside it, exactly as a
    trainer that runs only the forward under autocast: the same factors, the same float32 accumulation, the same
    ``.grad`` (run under autocast, the scoring and assembly products were rounded to bf16)."""
    inside, rep_in = _step(family, method, "autocast_both", **opts)
    outside, rep_out = _step(family, method, "autocast_forward", **opts)
    assert torch.equal(rep_in.weights, rep_out.weights)
    assert _rel(inside, outside) <= 1e-6, _rel(inside, outside)
