"""Shared fixtures for the world tests: a micro base model pretrained once per session into a temporary cache."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def world_cache(tmp_path_factory):
    """A fresh ``DRPOST_CACHE`` for the session (restored afterwards)."""
    old = os.environ.get("DRPOST_CACHE")
    path = tmp_path_factory.mktemp("drpost-cache")
    os.environ["DRPOST_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DRPOST_CACHE", None)
    else:
        os.environ["DRPOST_CACHE"] = old


@pytest.fixture(scope="session")
def micro(world_cache):
    """(model, tokenizer) of the micro base model, pretrained into the session cache."""
    from drpost.world.model import load_base_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_base_model("micro")
    finally:
        torch.set_num_threads(threads)
