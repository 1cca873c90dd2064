"""Baselines: DSIR importance weights by hand and its seeded selection; LESS (``baselines/less.py``) on a micro
model and a 40-example pool: scores are deterministic in the seed, pool copies of the targets score higher on
average, and ``less_select`` keeps the top fraction."""

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


@pytest.fixture(scope="module")
def micro_less():
    import torch

    from drpost.trainers.sft import encode_examples
    from drpost.world.arch import build_model
    from drpost.world.tasks import generate_examples
    from drpost.world.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model("micro", seed=0)
    targets = generate_examples(4, ["reverse"], ["qa"], seed="less-target")
    others = generate_examples(36, ["add", "upper", "count_char"], ["inst"], seed="less-pool")
    pool = targets + others  # pool rows 0..3 are the target examples themselves
    t_rows = encode_examples(tok, targets, 96)
    p_rows = encode_examples(tok, pool, 96)
    return model, tok, p_rows, t_rows


def test_less_scores_are_seeded_and_find_the_target_examples(micro_less):
    import torch

    from drpost.baselines.less import less_scores, less_select

    model, tok, p_rows, t_rows = micro_less
    kw = dict(warmup_frac=0.2, epochs=1, batch_size=4, proj_dim=64, seed=3)
    a = less_scores(model, tok, p_rows, t_rows, **kw)
    b = less_scores(model, tok, p_rows, t_rows, **kw)
    assert a.shape == (len(p_rows),) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert a[:4].mean() > a[4:].mean()  # copies of the targets score higher on average (random micro model)
    assert len(less_select(a, 0.1)) == 4  # round(0.1 * 40)
    assert not torch.equal(a, less_scores(model, tok, p_rows, t_rows, **{**kw, "seed": 4}))


def test_less_select_keeps_the_top_fraction():
    import torch

    from drpost.baselines.less import less_select

    scores = torch.tensor([0.1, 0.9, -0.3, 0.5, 0.7])
    assert less_select(scores, 0.4) == [1, 4] and less_select(scores, 0.01) == [1]
