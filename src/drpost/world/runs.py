"""The world's side of ``drpost sft|dpo|rlhf|rlvr``: what a CLI run takes from the benchmark world.

The trainers (``drpost.trainers``) never import the world; they take their model, data, answer checks and reward
model through a ``drpost.trainers.sources.Sources``. ``WorldSources`` is the one the command line uses (its
``RUNNERS`` point at ``sft`` / ``dpo`` / ``rlhf`` / ``rlvr`` here). On top of hub / local models and data files it
gives
- ``model.name_or_path=world``: the world's pretrained tiny base model of ``model.size``;
- ``data.setting`` (when neither ``data.general`` nor ``data.target`` is set): the world settings, built with seed
  0 (the data are fixed; ``seed`` varies training). SFT: ``drpost.world.settings`` (``default`` =
  ``SFT_DEFAULT_SETTING``), evaluated by greedy exact match on up to ``SFT_EVAL_EXAMPLES`` target test examples;
  DPO / RLHF / RLVR: ``drpost.world.rl_settings`` (``default`` = its ``DEFAULT_SETTINGS[paradigm]``), evaluated on
  ``RL_TEST_EXAMPLES`` held-out target prompts (unless ``data.eval`` is given) with retention exact match on the
  general families;
- the world task's verifier as the records' own check (``grpo.verifier=world`` or ``auto``, and greedy exact match
  in evaluation) for records that carry ``family`` and ``answer``;
- the setting's learned reward model for ``drpost rlhf`` on a world setting (``drpost.world.reward_model``).

Run it: ``drpost sft model.size=micro steps=20 output_dir=runs/try`` (or ``python -c "from drpost.world.runs import
sft; ..."`` with a parsed ``SFTConfig``).
"""

from __future__ import annotations

import difflib
from dataclasses import replace

from drpost.trainers.sources import Sources

SFT_DEFAULT_SETTING = "distribution_shift"
SFT_EVAL_EXAMPLES = 200  # target test examples scored by periodic evaluation on an SFT world setting
RL_TEST_EXAMPLES = 100  # held-out target prompts of an RL world setting scored by evaluation


def _load_base_model(mc):
    from drpost.world import model as world_model

    return world_model.load_base_model(mc.size)


def _sft_setting_name(name: str) -> str:
    from drpost.config import ConfigError
    from drpost.world.settings import SETTINGS

    name = SFT_DEFAULT_SETTING if name == "default" else name
    if name not in SETTINGS:
        close = difflib.get_close_matches(name, list(SETTINGS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"option 'data.setting': unknown world setting {name!r}{hint} (settings: default, "
                          f"{', '.join(SETTINGS)})")
    return name


class WorldSources(Sources):
    """Hub / local models and data files, plus the world's base model, settings, verifier and reward model."""

    models = {"world": _load_base_model}

    def sft_setting(self, config, tokenizer):
        from drpost.data.formats import DataError, make_record
        from drpost.trainers.setup import SFTData, sft_rows
        from drpost.world.evaluate import exact_match
        from drpost.world.settings import SETTINGS, build_setting

        d = config.data
        name = _sft_setting_name(d.setting)
        s = SETTINGS[name]
        # Build only what is used: splits are generated sequentially, so the first rows are the same as in the full
        # build. The data are fixed; config.seed varies training (as in the benchmarks).
        s = replace(s, n_pool=min(s.n_pool, d.max_general_samples or s.n_pool), n_retention=0,
                    n_test=min(s.n_test, SFT_EVAL_EXAMPLES))
        world = build_setting(s, 0)
        general = world.general[: d.max_general_samples]
        target = world.target_train[: d.max_target_samples]
        if not target:
            raise DataError(f"the target set is empty: world setting {name} has no target examples")

        def recs(xs, split):
            return [make_record(x, "prompt_completion", f"world:{name}/{split}", index=i)
                    for i, x in enumerate(xs, start=1)]

        g, t = recs(general, "general"), recs(target, "target")
        test = world.target_test[:SFT_EVAL_EXAMPLES]
        family = {r.where: x["family"] for r, x in zip(g, general)}
        g_rows = sft_rows(g, tokenizer, d.max_seq_length, d.overlong, "general")
        t_rows = sft_rows(t, tokenizer, d.max_seq_length, d.overlong, "target")
        e = recs(test, "test")
        e_rows = sft_rows(e, tokenizer, d.max_seq_length, d.overlong, "eval")
        kept = {r.where for r in e}
        test = [x for r, x in zip(recs(test, "test"), test) if r.where in kept]
        evaluate = (lambda model: {"exact_match": exact_match(model, tokenizer, test)}) if test else None
        return SFTData(g_rows, t_rows, [family[r.where] for r in g], e_rows, evaluate, source=f"world:{name}")

    def rl_setting(self, config, paradigm, tokenizer, test):
        from drpost.trainers.rl_common import RLData
        from drpost.world.evaluate import retention_exact_match
        from drpost.world.rl_settings import DEFAULT_SETTINGS, build_rl_setting, get_rl_setting

        d = config.data
        name = DEFAULT_SETTINGS[paradigm] if d.setting == "default" else d.setting
        data = build_rl_setting(get_rl_setting(name, paradigm), 0)
        return RLData(data.general[: d.max_general_samples], data.target_train[: d.max_target_samples],
                      test if test is not None else data.target_test[:RL_TEST_EXAMPLES],
                      lambda model: retention_exact_match(model, tokenizer, data.retention), name)

    def record_check(self, records):
        from drpost.world.evaluate import check, has_answers

        return check if has_answers(records) else None

    def reward_model(self, data, config):
        if data.setting is None:
            return None
        from drpost.world.reward_model import world_reward_model

        return world_reward_model(data.setting, config.model.size)


WORLD = WorldSources()


def sft(config) -> int:
    """``drpost sft`` (``drpost.trainers.sft.run`` with the world's sources)."""
    from drpost.trainers.sft import run

    return run(config, WORLD)


def dpo(config) -> int:
    """``drpost dpo`` (``drpost.trainers.dpo.run`` with the world's sources)."""
    from drpost.trainers.dpo import run

    return run(config, WORLD)


def rlhf(config) -> int:
    """``drpost rlhf`` (``drpost.trainers.rlhf.run`` with the world's sources)."""
    from drpost.trainers.rlhf import run

    return run(config, WORLD)


def rlvr(config) -> int:
    """``drpost rlvr`` (``drpost.trainers.rlvr.run`` with the world's sources)."""
    from drpost.trainers.rlvr import run

    return run(config, WORLD)
