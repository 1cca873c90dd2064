"""Fixtures of the benchmark tests: ``tiny_folder``, a small local copy of the real-model path (a tiny Llama with a
ChatML template, converted once per session from a GGUF the test writes; ``tests.test_models.write_tiny_gguf``),
which the real-model benchmark tests use instead of the real model; ``rigged_lr``, a validation that prefers one learning
rate (the lr-tuning tests)."""

from __future__ import annotations

import pytest

from drpost import models


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    from tests.test_models import write_tiny_gguf

    d = tmp_path_factory.mktemp("tinyreal")
    write_tiny_gguf(d / "tiny.gguf")
    return str(models.convert_gguf(d / "tiny.gguf", d / "converted"))


@pytest.fixture
def rigged_lr(monkeypatch):
    """``rig(worker_cls, winner)``: records each training's (seed, lr) in the returned list and makes validation EM
    1 for runs trained at ``winner``, 0 otherwise (the test set is left as measured), so a test can check which
    learning rate the tuning keeps."""

    def rig(worker_cls, winner: float) -> list:
        seen: list = []
        train_orig, eval_orig = worker_cls.train, worker_cls.evaluate

        def spy_train(self, policy, start, setting, seed, spec, recipe):
            seen.append((seed, recipe.lr))
            self.lr_trained = recipe.lr
            return train_orig(self, policy, start, setting, seed, spec, recipe)

        def rigged_evaluate(self, model, d, ref):
            return eval_orig(self, model, d, ref) | {"val_em": float(getattr(self, "lr_trained", None) == winner)}

        monkeypatch.setattr(worker_cls, "train", spy_train)
        monkeypatch.setattr(worker_cls, "evaluate", rigged_evaluate)
        return seen

    return rig
