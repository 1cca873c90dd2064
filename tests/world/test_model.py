"""Base model: sizes, micro pretraining, the disk cache (second load does not retrain)."""

from __future__ import annotations

import json

import pytest
import torch

from drpost.world import pretrain as P
from drpost.world.model import MODEL_SIZES, build_model, load_base_model, n_params


def test_sizes():
    assert set(MODEL_SIZES) >= {"micro", "tiny"}
    assert 30_000 <= n_params(build_model("micro")) <= 100_000
    assert 500_000 <= n_params(build_model("tiny")) <= 1_000_000
    with pytest.raises(ValueError):
        build_model("huge")


def test_micro_pretrains_and_caches(micro, world_cache, monkeypatch):
    model, tok = micro
    path = P.base_model_path("micro")
    assert path.parent == world_cache and (path / "model.safetensors").exists()
    info = json.loads((path / "pretrain.json").read_text())
    assert info["params"] == n_params(model)
    assert not model.training and model.config.vocab_size == len(tok)

    def boom(*a, **k):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(P, "pretrain", boom)
    model2, _ = load_base_model("micro")  # served from the cache
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert not any(p.name.startswith(".tmp") for p in world_cache.iterdir())  # atomic write left nothing behind


def test_pretraining_lowers_the_loss(micro):
    info = json.loads((P.base_model_path("micro") / "pretrain.json").read_text())
    assert info["curve"][-1][1] < 4.0  # from ln(259) = 5.56 at init


def test_cache_key_tracks_the_recipe(world_cache, monkeypatch):
    before = P.base_model_path("micro")
    monkeypatch.setitem(P.RECIPES, "micro", {**P.RECIPES["micro"], "steps": 7})
    assert P.base_model_path("micro") != before
