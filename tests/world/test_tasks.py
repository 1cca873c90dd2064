"""Task families: determinism, verifiers, label noise, formats and the derived data formats."""

from __future__ import annotations

import random

import pytest

from drpost.world.tasks import (
    FAMILIES,
    FAMILY_NAMES,
    FORMATS,
    PRETRAIN_FORMATS,
    TARGET_FORMATS,
    Difficulty,
    corrupt_answer,
    generate_examples,
    make_example,
    to_messages,
    to_rl_prompt,
    verify,
)

KEYS = {"prompt", "completion", "family", "answer", "noisy", "format"}


def test_at_least_twelve_families_with_three_paraphrases_per_set():
    assert len(FAMILY_NAMES) >= 12
    kinds = {f.kind for f in FAMILIES.values()}
    assert kinds == {"arithmetic", "string", "list", "format"}
    for fam in FAMILIES.values():
        for pset in {p for _, p in FORMATS.values()}:
            assert len(set(fam.phrases[pset])) >= 3, (fam.name, pset)


def test_same_seed_same_examples_other_seed_differs():
    a = generate_examples(300, formats=list(FORMATS), noise=0.2, seed=7)
    b = generate_examples(300, formats=list(FORMATS), noise=0.2, seed=7)
    c = generate_examples(300, formats=list(FORMATS), noise=0.2, seed=8)
    assert a == b
    assert a != c
    assert all(set(e) == KEYS for e in a)


def test_generation_does_not_touch_global_random_state():
    random.seed(123)
    before = random.random()
    random.seed(123)
    generate_examples(50, seed=1)
    assert random.random() == before


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_verifier_accepts_clean_and_rejects_corrupted(family):
    rng = random.Random(family)
    for d in (Difficulty(1, 3, 9, 9), Difficulty(2, 6), Difficulty(6, 9, 999, 99)):
        for _ in range(30):
            ex = make_example(rng, family, rng.choice(list(FORMATS)), d)
            assert not ex["noisy"] and ex["completion"] == ex["answer"]
            assert verify(family, ex["answer"], ex["answer"])
            assert verify(family, " " + ex["answer"] + "\nmore text", ex["answer"])  # first line only
            bad = corrupt_answer(rng, ex["answer"])
            assert bad != ex["answer"]
            assert not verify(family, bad, ex["answer"]), (family, bad, ex["answer"])


def test_label_noise_rate_and_metadata():
    ex = generate_examples(4000, noise=0.25, seed=3)
    rate = sum(e["noisy"] for e in ex) / len(ex)
    assert abs(rate - 0.25) < 0.03
    for e in ex:
        assert e["noisy"] == (e["completion"] != e["answer"])
        assert verify(e["family"], e["completion"], e["answer"]) != e["noisy"]
    assert not any(e["noisy"] for e in generate_examples(500, noise=0.0, seed=3))


def test_difficulty_knobs_change_lengths_and_ranges():
    short = generate_examples(200, ["reverse"], difficulty=Difficulty(2, 3), seed=0)
    long = generate_examples(200, ["reverse"], difficulty=Difficulty(8, 9), seed=0)
    assert max(len(e["answer"]) for e in short) <= 3 and min(len(e["answer"]) for e in long) >= 8
    big = generate_examples(200, ["add"], difficulty=Difficulty(max_num=999), seed=0)
    assert max(int(e["answer"]) for e in big) > 198


def test_formats_and_weights():
    assert not set(PRETRAIN_FORMATS) & set(TARGET_FORMATS)
    ex = generate_examples(400, {"add": 1.0, "upper": 0.0}, {"bracket": 1.0}, seed=0)
    assert {e["family"] for e in ex} == {"add"} and {e["format"] for e in ex} == {"bracket"}
    # each format uses its own phrase set
    for fmt, (_, pset) in FORMATS.items():
        e = make_example(random.Random(0), "reverse", fmt)
        assert any(p in e["prompt"] for p in FAMILIES["reverse"].phrases[pset])


def test_messages_and_rl_forms():
    e = generate_examples(1, noise=0.0, seed=5)[0]
    m = to_messages(e)
    assert [t["role"] for t in m["messages"]] == ["user", "assistant"]
    assert m["messages"][0]["content"] == e["prompt"] and m["messages"][1]["content"] == e["completion"]
    assert m["family"] == e["family"]
    r = to_rl_prompt(e)
    assert set(r) == {"prompt", "answer", "family"}
    assert verify(r["family"], r["answer"], r["answer"])
