"""DSIR (Xie et al. 2023): importance resampling of the general pool towards the target distribution.

Lower-cased word/punctuation tokens; unigrams and bigrams hashed into ``buckets`` (10,000); ``p_raw`` and
``p_target`` are the normalized bucket counts of the pool and of the target examples (optional Laplace
smoothing of the target, off by default: with 16 target examples one pseudo-count per bucket would swamp them);
log importance weight of an example = sum_j count_j (log p_target_j - log p_raw_j) (probabilities floored at 1e-8);
k examples are drawn without replacement by adding Gumbel noise to the log weights and taking the top k.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

_TOKEN = re.compile(r"\w+|[^\w\s]")


def _buckets(text: str, buckets: int) -> np.ndarray:
    """Hashed unigram + bigram bucket ids of a text (with repeats: their counts are the features)."""
    toks = _TOKEN.findall(text.lower())
    grams = toks + [a + " " + b for a, b in zip(toks, toks[1:])]
    return np.array([zlib.crc32(g.encode()) % buckets for g in grams], dtype=np.int64)  # stable, unlike hash()


def example_text(e: dict) -> str:
    return e["prompt"] + " " + e["completion"]


def dsir_log_weights(pool: list[dict], target: list[dict], buckets: int = 10_000, smoothing: float = 0.0) -> np.ndarray:
    """(len(pool),) log importance weights of each pool example."""
    ids = [_buckets(example_text(e), buckets) for e in pool]  # sparse features: bucket ids with repeats
    raw = np.bincount(np.concatenate(ids), minlength=buckets).astype(np.float64)
    tf = np.bincount(np.concatenate([_buckets(example_text(e), buckets) for e in target]),
                     minlength=buckets).astype(np.float64) + smoothing
    p_raw = np.maximum(raw / raw.sum(), 1e-8)
    p_tgt = np.maximum(tf / tf.sum(), 1e-8)
    diff = np.log(p_tgt) - np.log(p_raw)  # (buckets,)
    return np.array([diff[i].sum() for i in ids])  # sum_j count_j diff_j


def dsir_select(pool: list[dict], target: list[dict], k: int, seed: int = 0, buckets: int = 10_000) -> list[int]:
    """Indices of k pool examples resampled by importance (Gumbel top-k)."""
    logw = dsir_log_weights(pool, target, buckets)
    gumbel = np.random.default_rng(seed).gumbel(size=logw.shape)
    return np.argsort(-(logw + gumbel))[:k].tolist()
