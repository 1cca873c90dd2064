"""Fixtures for the reliability tests: a local micro model directory (random init, no pretraining, no download)
and a helper running ``drpost sft`` in-process with small settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drpost import cli

# a handful of steps on 32 general rows of the default world setting, no periodic eval
SMALL = ["steps=6", "eval_every=0", "general_batch_size=4", "data.max_general_samples=32",
         "data.max_seq_length=64", "optim.lr=1e-3", "device=cpu"]


@pytest.fixture(scope="session")
def micro_dir(tmp_path_factory) -> Path:
    """A Hugging Face model directory: the world's micro Llama (random init) and its byte-level tokenizer."""
    from drpost.world.model import build_model
    from drpost.world.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("micro-model")
    build_model("micro", seed=0).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path



def run_sft(argv: list[str], capsys=None) -> tuple[int, str]:
    """(exit code, stderr) of ``drpost sft ARGV`` run in-process."""
    try:
        code = cli.main(["sft", *argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def read_metrics(out: Path) -> dict:
    return json.loads((Path(out) / "metrics.json").read_text())
