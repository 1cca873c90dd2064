"""Fixtures of the benchmark tests: ``tiny_folder``, a small local copy of the real-model path (a tiny Llama with a
ChatML template, converted once per session from a GGUF the test writes; ``tests.test_models.write_tiny_gguf``),
which the real-model benchmark tests use instead of the real model."""

from __future__ import annotations

import pytest

from drpost import models


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    from tests.test_models import write_tiny_gguf

    d = tmp_path_factory.mktemp("tinyreal")
    write_tiny_gguf(d / "tiny.gguf")
    return str(models.convert_gguf(d / "tiny.gguf", d / "converted"))
