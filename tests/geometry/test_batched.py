"""The batched geometry (every ``direct`` block one GEMM, finished together: ``LocalGeometry(batched=True)``) against
the per-block reference (``batched=False``, one ``block_stats`` per block) and the fp64 torch.func oracle, on models
with several same-shape blocks and a mix of shapes (tiny Llama + LoRA: q/k/v/o/gate/up/down adapters), with
per-row gradients materialized in the backward and without."""

from collections import Counter

import pytest
import torch
from tests.geometry.test_kernels import block_slices
from tests.helpers import ORACLE_RTOL, batch, tiny_model

import drpost
import drpost.geometry.step_geometry as step_geometry
from drpost.geometry.capture import Capture
from drpost.geometry.oracle import reference_geometry
from drpost.objectives import causal_lm_loss
from drpost.step import LocalGeometry, MergedBatch, StepReport, Timer


def geometry(model, gen, tgt, batched: bool, materialize: bool, **kw):
    """One captured forward/backward, then the step's geometry. -> (StepGeometry, blocks, regularizer)"""
    reg = drpost.DataRegularizer(model, scoring="direct", **kw)
    reg.capture = Capture(model, materialize=materialize)
    mb = MergedBatch.build(gen, tgt, "cpu")
    rep = StepReport(blocks=reg.blocks)
    try:
        loss = reg._forward(mb, causal_lm_loss, Timer("cpu"), rep)
        blocks = reg._backward(loss)
        geo = LocalGeometry(batched=batched).geometry(reg, blocks, mb, 0.1, Timer("cpu"), rep)
        return geo, blocks, reg
    finally:
        reg.capture.reset()


@pytest.mark.parametrize("family,lora", [("llama", True), ("qwen2", False), ("gpt2", True)])
@pytest.mark.parametrize("materialize", [True, False])
@pytest.mark.parametrize("kw", [dict(method="layerwise_subset", frac=0.5),
                                dict(method="global_subset", frac=0.5, selection="greedy")],  # greedy: the Gram
                         ids=["scores", "gram"])
def test_batched_geometry_equals_per_block_and_oracle(family, lora, materialize, kw, monkeypatch):
    model = tiny_model(family, lora=lora)
    gen, tgt = batch(5, seed=1, T=9), batch(2, seed=2, T=7)  # one row per sample: rows' Gram = samples' Gram
    ref = reference_geometry(model, gen, tgt, causal_lm_loss)
    per_block, _, _ = geometry(model, gen, tgt, batched=False, materialize=materialize, **kw)

    def refuse(*a, **k):
        raise AssertionError("the batched geometry called block_stats")

    with monkeypatch.context() as mp:  # every block goes through the batched path
        mp.setattr(step_geometry, "block_stats", refuse)
        batched, blocks, _ = geometry(model, gen, tgt, batched=True, materialize=materialize, **kw)
    if lora:  # the model has several blocks of one shape and several shapes
        shapes = Counter(tuple(p.shape) for b in blocks for p in b.factored)
        assert max(shapes.values()) >= 2 and len(shapes) >= 2

    for name in ("scores", "target_sq", "gram"):  # batched == per block (fp64: to rounding)
        x, y = getattr(batched, name), getattr(per_block, name)
        if name == "gram" and "selection" not in kw:
            assert x is None and y is None
            continue
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-12 * y.abs().max()), name

    cols = block_slices(model, blocks, ref["names"])  # batched == oracle, block by block
    U, gT = ref["u"], ref["g_T"]
    for l, c in enumerate(cols):
        u, g = U[:, c], gT[c]
        scale = (u.norm(dim=1).max() * g.norm()).clamp_min(1e-30)
        assert torch.allclose(batched.scores[l], u @ g, atol=ORACLE_RTOL * scale, rtol=0), blocks[l].name
        assert torch.allclose(batched.target_sq[l], g @ g, rtol=ORACLE_RTOL, atol=1e-30), blocks[l].name
        if batched.gram is not None:
            assert torch.allclose(batched.gram[l], u @ u.t(), rtol=ORACLE_RTOL, atol=ORACLE_RTOL * u.norm() ** 2)


@pytest.mark.parametrize("kw", [dict(method="layerwise_subset"), dict(method="global_subset"),
                                dict(method="global_subset", scoring="compress", sketch="4x4")],
                         ids=["layerwise", "global", "global-compress"])
def test_batched_step_update_equals_per_block_step(kw):
    """The whole one-pass update (kept per-row gradients assembled by one GEMV per weight) is the same with the
    batched and the per-block geometry, and with and without materialized per-row gradients (compress: the same
    sketch of the rows as of the factors, so the same selection)."""
    gen, tgt = batch(5, seed=1, T=9), batch(2, seed=2, T=7)
    out = {}
    for batched in (True, False):
        for materialize in (True, False):
            model = tiny_model("llama", lora=True)
            reg = drpost.DataRegularizer(model, frac=0.5, **kw)
            reg.capture = Capture(model, materialize=materialize)
            reg.local_geometry = LocalGeometry(batched=batched)
            rep = reg.step(gen, tgt, causal_lm_loss)
            assert not rep.skipped
            out[batched, materialize] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    ref = out[False, False]
    for key, grads in out.items():
        for n, g in grads.items():
            assert torch.allclose(g, ref[n], rtol=1e-10, atol=1e-12 * ref[n].abs().max()), (key, n)
