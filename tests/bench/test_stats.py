"""The benchmark reports' small statistics: mean ± s.e., and the words that compare two methods' means (unpaired and
paired by seed)."""

import math

import pytest

from drpost.bench.stats import mean_se, paired, pm, versus


def test_mean_se_and_its_print():
    mu, se = mean_se([0.1, 0.2, 0.3])
    assert mu == pytest.approx(0.2) and se == pytest.approx(0.1 / math.sqrt(3))
    assert pm((mu, se)) == "0.200 ± 0.058" and pm(mean_se([0.5])) == "0.500" and pm(None) == ""


@pytest.mark.parametrize("a, b, word, tie", [
    ((0.30, 0.01), (0.20, 0.01), "beats", False),          # 0.10 apart, s.e. of the difference 0.014
    ((0.205, 0.01), (0.20, 0.01), "beats", True),          # ahead by less than the noise
    ((0.19, 0.03), (0.20, 0.01), "does not beat", True),   # behind by less than the noise
    ((0.10, 0.01), (0.20, 0.01), "does not beat", False),
    ((0.21, float("nan")), (0.20, float("nan")), "beats", False),  # one seed: no noise estimate, no note
])
def test_versus_says_when_a_difference_is_within_the_noise(a, b, word, tie):
    w, note = versus(a, b)
    assert w == word and ("within noise" in note) == tie


def test_paired_differences_use_the_shared_seeds_only():
    # a shifted copy of b on every shared seed: the unpaired s.e. is large, the paired one zero
    a, b = {0: 0.35, 1: 0.55, 2: 0.75, 9: 0.0}, {0: 0.30, 1: 0.50, 2: 0.70, 5: 1.0}
    assert paired(a, b) == " [paired by seed: +0.050 ± 0.000, ahead on 3 of 3]"
    assert versus(mean_se([0.35, 0.55, 0.75]), mean_se([0.30, 0.50, 0.70]))[1].startswith(" (within noise")
    d = [0.1, -0.2]
    assert paired({0: d[0], 1: d[1]}, {0: 0.0, 1: 0.0}) == f" [paired by seed: -0.050 ± {mean_se(d)[1]:.3f}, ahead on 1 of 2]"
    assert paired({0: 0.5}, {0: 0.1, 1: 0.2}) == ""  # one shared seed: no paired figure
