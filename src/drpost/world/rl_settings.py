"""World settings for the preference and RL paradigms: an RLHF setting, an RLVR setting and a DPO setting.

Owns ``RLSetting`` (declarative, frozen), ``RLSettingData`` (built splits) and ``build_rl_setting(setting, seed)``,
with the built-in settings in ``RL_SETTINGS`` and each paradigm's default in ``DEFAULT_SETTINGS``. Sized for two
CPU cores: the tiny world model, answers of at most a few tokens (rollouts use <= 12 new tokens).

- ``rlhf_format`` (like the paper's toxicity task). The reward is *learned* (``drpost.world.reward_model``) from
  preference pairs whose chosen response is the true answer and whose rejected response is either a near miss
  (``corrupt_answer``) or malformed output (another family's answer: JSON, dates, numbers, where letters belong).
  The behaviour it rewards -- a well-formed, correct answer -- is what the base model already shows on the general
  prompts (pretraining formats ``qa``/``inst``; a fifth of them in ``arrow``), but not on the target prompts:
  ``last_char`` asked in the unseen ``arrow`` format, where the base model emits JSON-like junk or does not stop
  (measured: base sampling accuracy about 3%, about 25% of responses never stop), as toxic prompts elicit toxicity.
- ``rlvr_arith``: verifiable arithmetic. General prompts: seven arithmetic/list families in the pretraining formats;
  target problem type: ``mul`` (held-out prompts). Rewards come from the world's verifiers (1 = correct).
  ``target_source="train"`` (the paper's ablation) draws target prompts from the general training prompts instead.
- ``dpo_pairs``: preference pairs, chosen = the true answer, rejected = a corrupted one. General pairs: eleven
  families in the pretraining formats with 20% of the pairs flipped (noisy preferences), the target family among
  them; target: ``compare`` pairs in the unseen ``bracket`` format (16 train pairs; base greedy accuracy about 0.28
  there vs 0.6 in the pretraining formats).

Example dicts are those of ``drpost.world.tasks`` (``prompt``, ``completion``, ``answer``, ``family``, ``format``);
pairs add ``chosen`` and ``rejected``. Try it: ``python -m drpost.world.rl_settings``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from drpost.world.tasks import Difficulty, corrupt_answer, make_example

Weights = tuple[tuple[str, float], ...]

STRING_FAMILIES = ("reverse", "upper", "sort_letters", "count_char", "first_char", "last_char", "dedupe")
ARITH_FAMILIES = ("add", "sub", "mul", "compare", "max_list", "sum_list", "count_char")


@dataclass(frozen=True)
class RLSetting:
    """A general -> target setting for RLHF / RLVR / DPO.

    paradigm: ``rlhf`` | ``rlvr`` | ``dpo``. general_families / general_formats: the general prompts (pairs);
    family_formats: per-family format overrides; target_family / target_format: the target prompts.
    pair_families / pair_formats: the reward model's preference data (rlhf). flip: fraction of general pairs with
    chosen and rejected swapped (dpo). target_source: ``heldout`` (default) or ``train`` (target prompts drawn from the
    general training prompts; the paper's RLVR ablation).
    """

    name: str
    paradigm: str
    general_families: Weights
    general_formats: Weights
    target_family: str
    target_format: str
    family_formats: tuple[tuple[str, Weights], ...] = ()
    pair_families: tuple[str, ...] = ()
    pair_formats: tuple[str, ...] = ("qa", "inst", "arrow", "bracket")
    junk_rate: float = 0.5
    flip: float = 0.0
    target_source: str = "heldout"
    difficulty: Difficulty = Difficulty()
    n_general: int = 4000
    n_target: int = 16
    n_val: int = 100
    n_test: int = 200
    n_retention: int = 40
    n_pairs: int = 4000
    description: str = ""


@dataclass
class RLSettingData:
    setting: RLSetting
    seed: int
    general: list[dict]  # prompts (rl) or pairs (dpo)
    target_train: list[dict]
    target_val: list[dict]
    target_test: list[dict]
    retention: dict[str, list[dict]]
    pairs: list[dict]  # reward-model preference pairs (rlhf), else []


def _pick(rng, weights: Weights) -> str:
    names, ws = zip(*weights)
    return rng.choices(names, ws)[0]


def _junk(rng: random.Random, family: str) -> str:
    """A malformed response: the answer of another family's example (JSON, a date, digits, letters)."""
    other = rng.choice([f for f in ("kv_json", "date", "sum_list", "sort_nums", "upper", "add") if f != family])
    return make_example(rng, other, "qa")["answer"]


def make_pair(rng: random.Random, ex: dict, junk_rate: float = 0.0) -> dict:
    """Preference pair of an example: chosen = true answer; rejected = junk (w.p. junk_rate) or a near miss."""
    rejected = _junk(rng, ex["family"]) if rng.random() < junk_rate else corrupt_answer(rng, ex["answer"])
    if rejected == ex["answer"]:
        rejected = ex["answer"] + "x"
    return {**ex, "chosen": ex["answer"], "rejected": rejected, "flipped": False}


def _general_example(rng, s: RLSetting) -> dict:
    fam = _pick(rng, s.general_families)
    fmts = dict(s.family_formats).get(fam, s.general_formats)
    return make_example(rng, fam, _pick(rng, fmts), s.difficulty)


def get_rl_setting(name: str, paradigm: str | None = None, option: str = "data.setting") -> RLSetting:
    """The built-in RL setting ``name`` (of ``paradigm`` when given); a ConfigError naming ``option``, with the
    closest names, when there is none."""
    import difflib

    from drpost.config import ConfigError

    names = [n for n, s in RL_SETTINGS.items() if paradigm is None or s.paradigm == paradigm]
    if name in names:
        return RL_SETTINGS[name]
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    of = f" {paradigm}" if paradigm else ""
    raise ConfigError(f"option '{option}': unknown{of} world setting {name!r}{hint} (settings: default, "
                      f"{', '.join(names)})")


def build_rl_setting(setting: RLSetting | str, seed: int = 0) -> RLSettingData:
    """Build a setting's splits; deterministic in (setting, seed). Strings name a built-in setting (an unknown
    name is a ConfigError naming ``data.setting``, see ``get_rl_setting``)."""
    s = get_rl_setting(setting) if isinstance(setting, str) else setting
    rng = random.Random(f"{seed}-{s.name}-general")
    general = [_general_example(rng, s) for _ in range(s.n_general)]
    trng = random.Random(f"{seed}-{s.name}-target")
    seen: set[str] = set()
    splits = []
    for n in (s.n_target, s.n_val, s.n_test):
        out, tries = [], 0
        while len(out) < n and tries < 50 * n:
            ex = make_example(trng, s.target_family, s.target_format, s.difficulty)
            tries += 1
            if ex["prompt"] not in seen:
                seen.add(ex["prompt"])
                out.append(ex)
        splits.append(out)
    train, val, test = splits
    if s.target_source == "train":  # paper's RLVR ablation: target prompts are general training prompts
        train = [general[i] for i in random.Random(f"{seed}-{s.name}-tsrc").sample(range(len(general)), s.n_target)]
    rrng = random.Random(f"{seed}-{s.name}-retention")
    fams = [f for f, w in s.general_families if w > 0]
    retention = {f: [make_example(rrng, f, "qa", s.difficulty) for _ in range(s.n_retention)] for f in fams}
    pairs: list[dict] = []
    prng = random.Random(f"{seed}-{s.name}-pairs")
    if s.paradigm == "dpo":
        general = [make_pair(prng, ex) for ex in general]
        for p in general:
            if prng.random() < s.flip:
                p["chosen"], p["rejected"], p["flipped"] = p["rejected"], p["chosen"], True
        train, val, test = ([make_pair(prng, ex) for ex in split] for split in (train, val, test))
    if s.paradigm == "rlhf":
        for _ in range(s.n_pairs):
            ex = make_example(prng, prng.choice(s.pair_families), prng.choice(s.pair_formats), s.difficulty)
            pairs.append(make_pair(prng, ex, s.junk_rate))
    return RLSettingData(s, seed, general, train, val, test, retention, pairs)


def _uniform(names) -> Weights:
    return tuple((n, 1.0) for n in names)


# each paradigm's setting when none is named (``data.setting=default``, ``drpost bench quality --paradigm``)
DEFAULT_SETTINGS = {"rlhf": "rlhf_format", "rlvr": "rlvr_arith", "dpo": "dpo_pairs"}
RL_SETTINGS: dict[str, RLSetting] = {s.name: s for s in [
    RLSetting(
        name="rlhf_format", paradigm="rlhf",
        general_families=_uniform(STRING_FAMILIES + ("compare", "max_list")),
        general_formats=(("qa", 0.4), ("inst", 0.4), ("arrow", 0.2)),
        family_formats=(("last_char", (("qa", 0.5), ("inst", 0.5))),),
        target_family="last_char", target_format="arrow",
        pair_families=STRING_FAMILIES + ("compare", "max_list"),
        description="learned reward for well-formed correct answers; target prompts in an unseen format"),
    RLSetting(
        name="rlvr_arith", paradigm="rlvr",
        general_families=_uniform(ARITH_FAMILIES),
        general_formats=(("qa", 0.5), ("inst", 0.5)),
        target_family="mul", target_format="qa",
        description="verifiable arithmetic: broad general problems, target problem type mul (held-out prompts)"),
    RLSetting(
        name="rlvr_arith_trainsrc", paradigm="rlvr",
        general_families=_uniform(ARITH_FAMILIES),
        general_formats=(("qa", 0.5), ("inst", 0.5)),
        target_family="mul", target_format="qa", target_source="train",
        description="the paper's ablation: target prompts drawn from the general training prompts"),
    RLSetting(
        name="dpo_pairs", paradigm="dpo",
        general_families=_uniform(STRING_FAMILIES + ("compare", "max_list", "add", "mul")),
        general_formats=(("qa", 0.5), ("inst", 0.5)),
        target_family="compare", target_format="bracket", flip=0.2,
        description="noisy general preference pairs; target pairs of one family in an unseen format"),
]}


if __name__ == "__main__":
    for name in RL_SETTINGS:
        d = build_rl_setting(name)
        print(name, len(d.general), len(d.target_train), len(d.target_test), len(d.pairs))
        print("  general:", d.general[0])
        print("  target:", d.target_train[0])
