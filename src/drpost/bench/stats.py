"""Small statistics shared by the benchmark reports (quality, RL, MeSO): mean and standard error over seeds.

Lives apart from ``quality`` and ``rl`` so that neither report module imports the other.
"""

from __future__ import annotations

import math


def best_by_validation(records: list[dict]) -> dict[str, dict]:
    """Per method, the record with the best validation exact match (ties: lower validation loss): the knob-tuning
    rule of the quality benchmarks. ``records`` are runs of one setting and one seed."""
    best: dict[str, dict] = {}
    for r in records:
        cur = best.get(r["method"])
        if cur is None or (r["val_em"], -r["val_loss"]) > (cur["val_em"], -cur["val_loss"]):
            best[r["method"]] = r
    return best


def mean_se(xs: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of ``xs``; the error is nan for fewer than two values."""
    n = len(xs)
    mu = sum(xs) / n
    if n < 2:
        return mu, float("nan")
    var = sum((x - mu) ** 2 for x in xs) / (n - 1)
    return mu, math.sqrt(var / n)
