"""Baselines: DSIR importance weights by hand, Gumbel top-k, LESS on a micro pool, and every method on a micro run."""

import math

import pytest

from drpost.baselines.dsir import dsir_log_weights, dsir_select


def ex(text):
    return {"prompt": text, "completion": ""}


def test_dsir_log_weight_matches_hand_computation():
    pool = [ex("a b"), ex("c")]
    target = [ex("a")]
    B = 10_000
    w = dsir_log_weights(pool, target, buckets=B, smoothing=1.0)  # smoothing on: every bucket is finite
    # pool grams: a, b, "a b", c -> 4 tokens in 4 buckets (distinct hashes here); target: a (+1 smoothing everywhere)
    p_raw = 1 / 4
    p_a = 2 / (1 + B)
    p_other = 1 / (1 + B)
    expected0 = (math.log(p_a) - math.log(p_raw)) + 2 * (math.log(p_other) - math.log(p_raw))
    expected1 = math.log(p_other) - math.log(p_raw)
    assert w[0] == pytest.approx(expected0) and w[1] == pytest.approx(expected1)


def test_dsir_select_prefers_target_like_examples_and_is_seeded():
    pool = [ex(f"sort these letters {i}") for i in range(50)] + [ex(f"add {i} and {i}") for i in range(50)]
    target = [ex("sort these letters")] * 4
    sel = dsir_select(pool, target, 20, seed=0)
    assert sel == dsir_select(pool, target, 20, seed=0) and len(set(sel)) == 20
    assert sum(i < 50 for i in sel) >= 18
