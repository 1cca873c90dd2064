"""Built-in settings: sizes, the target skill inside every pool, clean disjoint target splits, determinism."""

from __future__ import annotations

import dataclasses

import pytest

from drpost.world.settings import SETTINGS, Setting, build_setting
from drpost.world.tasks import PRETRAIN_FORMATS, verify


@pytest.fixture(scope="module")
def built():
    return {name: build_setting(name, 0) for name in SETTINGS}


def test_three_paper_shaped_settings():
    assert {"format_shift", "sparse_related", "distribution_shift"} <= set(SETTINGS)
    for s in SETTINGS.values():
        assert dataclasses.is_dataclass(s) and s.n_pool >= 20000 and s.n_target == 16 and s.n_test == 500
        with pytest.raises(dataclasses.FrozenInstanceError):
            s.noise = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("name", list(SETTINGS))
def test_sizes_and_splits(built, name):
    d, s = built[name], SETTINGS[name]
    assert len(d.general) == s.n_pool
    assert (len(d.target_train), len(d.target_val), len(d.target_test)) == (16, s.n_val, 500)
    assert set(d.retention) == {f for f, w in s.pool_families if w > 0}
    assert all(len(v) == s.n_retention for v in d.retention.values())
    prompts = [e["prompt"] for e in d.target_train + d.target_val + d.target_test]
    assert len(set(prompts)) == len(prompts)  # target splits disjoint
    for e in d.target_train + d.target_val + d.target_test:
        assert e["family"] == s.target_family and e["format"] == s.target_format and not e["noisy"]
    assert s.target_format not in PRETRAIN_FORMATS  # the base model never read the target format
    for rows in d.retention.values():
        assert not any(e["noisy"] for e in rows)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_pool_contains_the_target_skill(built, name):
    d, s = built[name], SETTINGS[name]
    share = sum(e["family"] == s.target_family for e in d.general) / len(d.general)
    assert share >= 0.04, share
    clean = [e for e in d.general if e["family"] == s.target_family and not e["noisy"]]
    assert len(clean) > 500 and all(verify(e["family"], e["completion"], e["answer"]) for e in clean)
    noisy = sum(e["noisy"] for e in d.general) / len(d.general)
    assert abs(noisy - s.noise) < 0.02


def test_setting_shapes(built):
    fs = built["format_shift"]
    tf = SETTINGS["format_shift"].target_family
    assert all(e["format"] != "arrow" for e in fs.general if e["family"] == tf)  # skill only in other formats
    assert any(e["format"] == "arrow" for e in fs.general)  # format only with other skills
    sr = SETTINGS["sparse_related"]
    assert 0.04 <= sr.pool_share(sr.target_family) <= 0.10
    ds = built["distribution_shift"]
    pairs = [e["answer"].count(":") for e in ds.target_test]
    pool_pairs = [e["answer"].count(":") for e in ds.general if e["family"] == "kv_json"]
    assert min(pairs) >= 3 and max(pairs) > max(pool_pairs)  # shifted sizes (3 pairs overlap)
    assert sum(pairs) / len(pairs) > 1.5 * sum(pool_pairs) / len(pool_pairs)


def test_deterministic_by_seed():
    small = dataclasses.replace(SETTINGS["sparse_related"], n_pool=300, n_val=20, n_test=50, n_retention=5)
    a, b, c = build_setting(small, 1), build_setting(small, 1), build_setting(small, 2)
    assert a.general == b.general and a.target_test == b.target_test and a.retention == b.retention
    assert a.general != c.general and a.target_train != c.target_train
    assert isinstance(small, Setting) and a.summary()["general"] == 300
