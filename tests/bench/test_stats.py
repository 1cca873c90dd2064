"""The benchmark reports' small statistics: mean ± s.e., and the words that compare two methods' means."""

import math

import pytest

from drpost.bench.stats import mean_se, pm, versus


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
