"""Shared fixtures for the objective tests: tiny float64 Llama models built from configs (no downloads), random
prompt/response rows, and an independent per-row log-prob reference (one row at a time, no padding)."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from drpost.data.collate import IGNORE, collate

VOCAB = 64


def _tiny_lm(seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    return LlamaForCausalLM(cfg).to(torch.float64).eval()


def _rows(n: int, seed: int, prompt=(2, 5), response=(1, 6)) -> list[dict]:
    """n rows of random tokens: a prompt (no loss) then a response (loss), lengths drawn from the given ranges."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        p = int(torch.randint(prompt[0], prompt[1] + 1, (1,), generator=g))
        r = int(torch.randint(response[0], response[1] + 1, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (p + r,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * p + ids[p:]})
    return rows


def _manual_logps(model, row: dict) -> torch.Tensor:
    """Token-aligned log-probs (L,) of one unpadded row, computed alone: entry t = log p(token t | tokens < t) on
    response tokens, 0 elsewhere. Written without the library's shifting helpers."""
    ids = torch.tensor(row["input_ids"])
    logits = model(input_ids=ids[None]).logits[0]  # (L, V)
    out = torch.zeros(len(ids), dtype=logits.dtype)
    parts = []
    for t in range(1, len(ids)):
        if row["labels"][t] != IGNORE:
            parts.append((t, torch.log_softmax(logits[t - 1], -1)[ids[t]]))
    if parts:
        idx = torch.tensor([t for t, _ in parts])
        out = out.index_put((idx,), torch.stack([v for _, v in parts]))
    return out


def _trim(batch: dict, i: int, keys_rt=(), keys_r=()) -> dict:
    """Row i of a right-padded batch alone, cut to its own length; per-token keys sliced alike."""
    L = int(batch["attention_mask"][i].sum())
    out = {k: batch[k][i : i + 1, :L] for k in ("input_ids", "attention_mask", "labels")}
    for k in keys_rt:
        out[k] = batch[k][i : i + 1, :L]
    for k in keys_r:
        out[k] = batch[k][i : i + 1]
    return out


@pytest.fixture
def U():
    """Helper namespace: tiny_lm(seed), rows(n, seed), collate, manual_logps(model, row), trim(batch, i, ...)."""
    return types.SimpleNamespace(tiny_lm=_tiny_lm, rows=_rows, collate=collate, manual_logps=_manual_logps,
                                 trim=_trim, IGNORE=IGNORE, VOCAB=VOCAB)


@pytest.fixture(autouse=True)
def _f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
