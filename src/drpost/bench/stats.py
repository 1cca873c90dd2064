"""Small statistics shared by the benchmark reports (quality, RL, MeSO): mean and standard error over seeds, how a
pair is printed, and how two methods' means are compared in words (unpaired, and paired by seed).

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


def pm(ms: tuple[float, float] | None) -> str:
    """'0.123 ± 0.004' (mean ± standard error), just the mean for a single seed, '' for None."""
    if ms is None:
        return ""
    mu, se = ms
    return f"{mu:.3f}" if se != se else f"{mu:.3f} ± {se:.3f}"


def versus(a: tuple[float, float], b: tuple[float, float]) -> tuple[str, str]:
    """('beats' | 'does not beat', note) for the mean of ``a`` against the mean of ``b`` (each (mean, s.e.)). The
    note is ' (within noise: ...)' where the difference is no larger than its standard error
    ``sqrt(se_a^2 + se_b^2)``, so a table does not call a tie a win (or a loss); '' otherwise or with one seed."""
    (ma, sa), (mb, sb) = a, b
    word = "beats" if ma > mb else "does not beat"
    se = math.hypot(sa, sb)
    note = f" (within noise: difference {ma - mb:+.3f}, its s.e. {se:.3f})" if se == se and abs(ma - mb) <= se else ""
    return word, note


def paired(a: dict[int, float], b: dict[int, float]) -> str:
    """' [paired by seed: +0.068 ± 0.015, ahead on 4 of 4]' for ``a - b`` over the seeds both have (seed -> value),
    '' with fewer than two. Where the seed redraws the data and both methods ran on each seed's data, the paired
    difference removes the between-seed spread that ``versus``'s unpaired standard error keeps."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return ""
    diffs = [a[k] - b[k] for k in seeds]
    mu, se = mean_se(diffs)
    return f" [paired by seed: {mu:+.3f} ± {se:.3f}, ahead on {sum(d > 0 for d in diffs)} of {len(diffs)}]"
