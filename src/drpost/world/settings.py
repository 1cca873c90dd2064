"""Benchmark settings: a general pool and a target task, declared as data and built deterministically by seed.

Owns: ``Setting`` (frozen, declarative), ``SettingData`` (the built splits), ``build_setting(setting, seed)`` and the
three built-in settings in ``SETTINGS``, shaped like the paper's SFT settings:

- ``format_shift`` (like alpaca -> samsum): 16 families in the pretraining formats; the target skill (``sort_letters``)
  is in the pool only in those formats; the target asks for it in the unseen ``arrow`` format (template and
  instruction phrases the base model never read). A fifth of the other families' pool rows use ``arrow`` too, so the
  pool can teach the format and the skill, only never together.
- ``sparse_related`` (like LESS mix -> tydiqa): the pool is mostly unrelated string/format families; 6% is the target
  skill (``sum_list``) in the target's ``bracket`` format, 8% related list skills in the same format.
- ``distribution_shift`` (like triviaqa -> nq): half the pool is the target skill (``kv_json``) in the target format
  on 1-3 key=value pairs (mostly 1-2) with 30% label noise, plus four string families; the target has 3-4 pairs.
  The overlap (3 pairs) is deliberate: with disjoint lengths (reverse 2-5 -> 6-8 letters) nothing, not even
  target-only, left 0% with the tiny base; with the overlap, plain pool training reached 0.42 vs target-only 0.17.

Design rule (docs/design.md, section 9): subset methods never train on target rows, so every pool contains the target
skill, diluted (sparse_related), in another format (format_shift) or shifted and noisy (distribution_shift).

All target splits (train 16, val, test 500) and retention sets are clean; target splits are disjoint by prompt.
Try it: ``python -m drpost.world.settings`` prints each setting's sizes and family shares.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from drpost.world.tasks import FAMILY_NAMES, Difficulty, make_example

Weights = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Setting:
    """A general pool -> target task setting.

    pool_families: (family, weight) pairs of the pool; pool_formats: (format, weight) for the pool's rows;
    family_pool_formats: per-family overrides of ``pool_formats``, as (family, ((format, weight), ...)) pairs;
    noise: label-noise rate of the pool; target rows are clean. Difficulties: pool vs target (the shift knobs).
    """

    name: str
    pool_families: Weights
    target_family: str
    target_format: str
    pool_formats: Weights
    family_pool_formats: tuple[tuple[str, Weights], ...] = ()
    noise: float = 0.0
    pool_difficulty: Difficulty = field(default_factory=Difficulty)
    target_difficulty: Difficulty = field(default_factory=Difficulty)
    n_pool: int = 20000
    n_target: int = 16
    n_val: int = 200
    n_test: int = 500
    n_retention: int = 100
    description: str = ""

    def pool_share(self, family: str) -> float:
        total = sum(w for _, w in self.pool_families)
        return sum(w for f, w in self.pool_families if f == family) / total


@dataclass
class SettingData:
    """The built splits of a setting (lists of example dicts, see ``drpost.world.tasks``)."""

    setting: Setting
    seed: int
    general: list[dict]
    target_train: list[dict]
    target_val: list[dict]
    target_test: list[dict]
    retention: dict[str, list[dict]]

    def summary(self) -> dict:
        fam = Counter(e["family"] for e in self.general)
        fmt = Counter(e["format"] for e in self.general)
        n = len(self.general)
        return {"name": self.setting.name, "general": n, "target_train": len(self.target_train),
                "target_val": len(self.target_val), "target_test": len(self.target_test),
                "retention": {f: len(v) for f, v in self.retention.items()},
                "noisy": round(sum(e["noisy"] for e in self.general) / max(n, 1), 4),
                "families": {f: round(c / n, 4) for f, c in fam.most_common()},
                "formats": {f: round(c / n, 4) for f, c in fmt.most_common()}}


def _pick(rng: random.Random, weights: Weights) -> str:
    names, ws = zip(*weights)
    return rng.choices(names, ws)[0]


def _pool_example(rng: random.Random, s: Setting, family: str, noise: float) -> dict:
    fmts = dict(s.family_pool_formats).get(family, s.pool_formats)
    return make_example(rng, family, _pick(rng, fmts), s.pool_difficulty, noise)


def _target_splits(s: Setting, seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Clean target rows, unique by prompt across train/val/test (rejection sampling, bounded)."""
    rng = random.Random(f"{seed}-{s.name}-target")
    seen: set[str] = set()
    splits = []
    for n in (s.n_target, s.n_val, s.n_test):
        out, tries = [], 0
        while len(out) < n and tries < 50 * n:
            ex = make_example(rng, s.target_family, s.target_format, s.target_difficulty)
            tries += 1
            if ex["prompt"] not in seen:
                seen.add(ex["prompt"])
                out.append(ex)
        if len(out) < n:
            raise ValueError(f"setting {s.name}: target distribution too small for {n} distinct examples")
        splits.append(out)
    return splits[0], splits[1], splits[2]


def get_setting(name: str, option: str = "data.setting") -> Setting:
    """The built-in setting ``name``; a ConfigError naming ``option``, with the closest name, when there is none."""
    import difflib

    from drpost.config import ConfigError

    if name in SETTINGS:
        return SETTINGS[name]
    close = difflib.get_close_matches(str(name), list(SETTINGS), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"option '{option}': unknown world setting {name!r}{hint} (settings: {', '.join(SETTINGS)})")


def build_setting(setting: Setting | str, seed: int = 0) -> SettingData:
    """Build a setting's splits; deterministic in (setting, seed): the seed draws the pool, the target examples,
    the validation and test sets and the retention sets. Strings name a built-in setting (``get_setting``)."""
    s = get_setting(setting) if isinstance(setting, str) else setting
    rng = random.Random(f"{seed}-{s.name}-pool")
    general = [_pool_example(rng, s, _pick(rng, s.pool_families), s.noise) for _ in range(s.n_pool)]
    train, val, test = _target_splits(s, seed)
    rrng = random.Random(f"{seed}-{s.name}-retention")
    retention = {f: [_pool_example(rrng, s, f, 0.0) for _ in range(s.n_retention)]
                 for f, w in s.pool_families if w > 0}
    return SettingData(s, seed, general, train, val, test, retention)


def _uniform(names) -> Weights:
    return tuple((n, 1.0) for n in names)


_UNRELATED = ("reverse", "upper", "sort_letters", "count_char", "first_char", "last_char", "dedupe", "kv_json",
              "date", "add", "sub", "compare")

SETTINGS: dict[str, Setting] = {s.name: s for s in [
    Setting(
        name="format_shift",
        pool_families=_uniform(FAMILY_NAMES),
        target_family="sort_letters", target_format="arrow",
        pool_formats=(("qa", 0.4), ("inst", 0.4), ("arrow", 0.2)),
        family_pool_formats=(("sort_letters", (("qa", 0.5), ("inst", 0.5))),),
        noise=0.05,
        pool_difficulty=Difficulty(min_len=2, max_len=6), target_difficulty=Difficulty(min_len=2, max_len=6),
        description="alpaca->samsum-like: the target skill is in the pool, but only in other formats"),
    Setting(
        name="sparse_related",
        pool_families=_uniform(_UNRELATED) + (("sum_list", 0.06 / 0.86 * 12), ("max_list", 0.04 / 0.86 * 12),
                                              ("sort_nums", 0.04 / 0.86 * 12)),
        target_family="sum_list", target_format="bracket",
        pool_formats=(("qa", 0.5), ("inst", 0.5)),
        family_pool_formats=tuple((f, (("bracket", 1.0),)) for f in ("sum_list", "max_list", "sort_nums")),
        noise=0.1,
        pool_difficulty=Difficulty(min_len=2, max_len=5), target_difficulty=Difficulty(min_len=2, max_len=5),
        description="LESS->tydiqa-like: mostly unrelated pool, 6% target skill in the target format"),
    Setting(
        name="distribution_shift",
        pool_families=(("kv_json", 4.0), ("upper", 1.0), ("first_char", 1.0), ("dedupe", 1.0), ("last_char", 1.0)),
        target_family="kv_json", target_format="arrow",
        pool_formats=(("arrow", 1.0),),
        noise=0.3,
        pool_difficulty=Difficulty(min_len=2, max_len=7), target_difficulty=Difficulty(min_len=6, max_len=8),
        description="triviaqa->nq-like: same skill and format, fewer key=value pairs and 30% label noise in the pool"),
]}

# sparse_related: the three list families get 6% / 4% / 4% of the pool (12 unrelated families share the other 86%)


if __name__ == "__main__":
    import json

    for name in SETTINGS:
        print(json.dumps(build_setting(name, 0).summary()))
