"""Tiny datasets and helpers shared by the TRL adapter tests (no tests here)."""

from __future__ import annotations

import datasets


def _words(i):
    return ["ab", "cd", "ef", "gh", "ij", "kl"][i % 6]


def sft_data(n, off=0):
    return datasets.Dataset.from_dict({"prompt": [f"{_words(i)}=" for i in range(off, off + n)],
                                       "completion": [f"{_words(i + 1)}{i % 7}" for i in range(off, off + n)]})


def dpo_data(n, off=0):
    return datasets.Dataset.from_dict({"prompt": [f"{_words(i)}?" for i in range(off, off + n)],
                                       "chosen": [f"{_words(i)}{i % 5}" for i in range(off, off + n)],
                                       "rejected": [f"{_words(i + 2)}x" for i in range(off, off + n)]})


def prompts(n, off=0):
    return datasets.Dataset.from_dict({"prompt": [f"{_words(i)}:" for i in range(off, off + n)]})


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}
