"""Streamed layer scope (geometry/stream.py): a separable set's block solved and assembled as soon as it is scored
gives the same step as the full solve then the assembly, and only separable sets, one-pass, local steps stream."""

import pytest
import torch
from tests.helpers import batch, tiny_model

import drpost
from drpost.feasible.subset import LayerWiseSubset
from drpost.geometry import stream as stream_mod
from drpost.objectives import causal_lm_loss

LAYERWISE = [dict(frac=0.5), dict(frac=1.0, selection="filter"), dict(frac=0.5, selection="greedy"),
             dict(k=2)]


def _step(model, separable: bool, **kw):
    model.zero_grad(set_to_none=True)
    reg = drpost.DataRegularizer(model, method="layerwise_subset", scoring="direct", **kw)
    reg.feasible.separable = separable
    rep = reg.step(batch(6, seed=3, sample_index=[0, 0, 1, 2, 3, 4]), batch(2, seed=4), causal_lm_loss, lr=0.1)
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return g, rep


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("kw", LAYERWISE, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_streamed_step_equals_the_full_solve_then_assembly(family, kw):
    model = tiny_model(family)
    a, ra = _step(model, True, **kw)
    b, rb = _step(model, False, **kw)
    assert ra.streamed and not rb.streamed
    assert torch.equal(ra.weights, rb.weights)
    assert torch.allclose(ra.block_scores, rb.block_scores, rtol=1e-12, atol=1e-14)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-10, atol=1e-12 * b[k].abs().max()), k


def test_streaming_frees_each_block_and_moves_its_time_to_the_assembly():
    model = tiny_model("llama")
    seen = []
    orig = stream_mod.Streamer.finish

    def spy(self, l, block, *args):
        orig(self, l, block, *args)
        seen.append((l, block.rows is None and not any(block.factored.values()) and not block.small))

    stream_mod.Streamer.finish = spy
    try:
        _, rep = _step(model, True, frac=0.5)
    finally:
        stream_mod.Streamer.finish = orig
    assert seen and all(freed for _, freed in seen)
    assert len(rep.streamed) == len(seen)
    assert rep.timings["assembly"] > 0 and rep.timings["scoring"] > 0


@pytest.mark.parametrize("case", ["global", "two_pass", "row_weights", "slack", "ghost"])
def test_only_separable_one_pass_local_steps_stream(case):
    model = tiny_model("llama")
    kw = dict(scoring="direct", frac=0.5)
    method = "global_subset" if case == "global" else "layerwise_subset"
    if case == "two_pass":
        kw["assembly"] = "two_pass"
    if case == "slack":
        kw["slack"] = 0.1
    if case == "ghost":
        kw["scoring"] = "full_ghost"
    reg = drpost.DataRegularizer(model, method=method, **kw)
    gen, tgt = batch(4, seed=1), batch(1, seed=2)
    if case == "row_weights":
        _, rep = reg.row_weights(gen, tgt, causal_lm_loss)
    else:
        rep = reg.step(gen, tgt, causal_lm_loss)
    model.zero_grad(set_to_none=True)
    assert not rep.streamed


def test_separable_is_declared_by_layer_scope_subsets_only():
    assert LayerWiseSubset().separable
    assert not drpost.feasible.make_feasible("global_subset").separable
    assert not drpost.feasible.make_feasible("hull", scope="layer").separable


def test_cost_model_charges_ghost_the_assembly_it_leaves():
    from drpost.geometry.cost import Rates, method_costs

    shape = [(576, 576, 1, 256)]  # a SmolLM2 attention projection at T=256, 8 + 1 rows
    plain = method_costs(shape, 8, 1, 256, False, Rates())
    streamed = method_costs(shape, 8, 1, 256, False, Rates(), assembly_rows=4)
    assert plain["full_ghost"] < plain["direct"]  # scores alone: the token pairs are cheaper
    assert streamed["direct"] == plain["direct"] and streamed["full_ghost"] > streamed["direct"]
