"""``drpost bench real paradigm=rlhf`` on a small local copy of the real-model path (the tiny ChatML Llama converted
from a GGUF the test writes, as in ``tests/bench/test_real_rl.py``), never the real model.

Checks: one record per run with the schema (target EM beside the reward model's score, KL, the reward-vs-KL curve
with its planned points, round 0 shared by the methods of a seed), the reward model trained once per setting, cached,
read back with the weights it was trained to, and trained again when the cache is another model's; re-runs run only
what is missing; the fixed-KL reading (``kl_budget``, ``reward_at_kl``) on hand-made curves; the budget against the
help text; every option rlhf does not read refused by name.
Run: ``pytest -q -p no:xdist tests/bench/test_real_rlhf.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing

import pytest

from drpost import cli
from drpost.bench import real, real_rl, real_rl_data, real_rlhf
from drpost.bench.real_common import RealSizes
from drpost.bench.records import load_records, record_name
from drpost.config import BenchRealConfig, ConfigError, leaf_options
from drpost.trainers import reward_model as rmod

SMALL = RealSizes(n_pool=60, n_val=4, n_test=6, n_retention=2, max_new_tokens=4)
SCHEMA = {"setting", "method", "label", "knob", "seed", "model", "paradigm", "target_em", "rm_score", "kl",
          "retention_em", "val_em", "val_loss", "seconds_per_step", "wall_seconds", "budget", "start"}
RM_SMALL = {**real_rlhf.RM_RECIPE, "steps": 2, "batch_size": 4, "n_target": 8, "held_out_general": 3,
            "held_out_target": 3, "exclude_seeds": 3}


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(real_rlhf, "REAL_SIZES", SMALL)
    monkeypatch.setattr(real_rlhf, "RM_RECIPE", RM_SMALL)
    monkeypatch.setattr(real_rlhf, "N_CURVE", 4)
    monkeypatch.setattr(real_rl_data, "N_PAIRS", 10)
    monkeypatch.setattr(real_rl, "REAL_RECIPE", dataclasses.replace(real_rl.REAL_RECIPE, steps=2))  # warm start
    monkeypatch.setattr(real_rl, "_WORKER", None)  # each test loads its own worker
    monkeypatch.setattr(real_rl, "LR_GRID", {})  # the budget's lr only, unless a test gives lrs


def _bench(folder, out, *extra):
    return cli.main(["bench", "real", "paradigm=rlhf", f"model={folder}", f"output_dir={out}", "workers=1",
                     "steps=2", "seeds=0", *extra])


def _rec(out, method, seed=0):
    return json.loads((out / "raw" / record_name("format_shift", method, real_rl.knob_of("rlhf", method),
                                                 seed)).read_text())


def test_rlhf_sweep_records_curves_reward_model_cache_and_resume(tiny_folder, tmp_path, small, monkeypatch):
    trained = []
    train_orig = rmod.train_reward_model

    def spy_train(*a, **kw):
        trained.append(len(a[2]))
        return train_orig(*a, **kw)

    monkeypatch.setattr(rmod, "train_reward_model", spy_train)
    out = tmp_path / "rlhf"
    methods = ("base", "warm_start", "full_training", "iif", "layerwise_subset")
    assert _bench(tiny_folder, out, f"methods={','.join(methods)}") == 0
    assert sorted(p.name for p in (out / "raw").glob("*.json")) == sorted(
        record_name("format_shift", m, real_rl.knob_of("rlhf", m), 0) for m in methods)
    # the reward model: trained once, before the runs, on 2 pairs per prompt (general 10, target 8; 3 + 3 held out)
    assert trained == [2 * (10 - 3 + 8 - 3)]
    info = json.loads((out / "cache" / "reward_model__format_shift" / "reward_model.json").read_text())
    assert info["model"] == tiny_folder and info["recipe"] == RM_SMALL and info["n_pairs"]["held_out"] == 12
    acc = info["heldout_accuracy"]
    assert 0.0 <= acc["all"] <= 1.0 and acc["target_vs_corrupted"] is not None
    recs = {m: _rec(out, m) for m in methods}
    for r in recs.values():
        assert SCHEMA <= set(r) and r["paradigm"] == "rlhf" and r["start"] == "sft_warm_start"
        assert r["rm_heldout_accuracy"] == acc and r["rm_test_overlap"] == 0 and math.isfinite(r["rm_score"])
    assert recs["base"]["budget"] is None and recs["warm_start"]["kl"] == 0.0
    lay = recs["layerwise_subset"]
    assert lay["knob"] == 0.5 and lay["budget"]["rounds"] == 2 and lay["budget"]["lora_r"] == 8
    assert lay["budget"]["kl_coef"] == 0.05 and lay["seconds_per_step"] > 0 and lay["kl"] >= 0.0
    # the reward-vs-KL curve: round 0 (the start model, shared by the seed's methods), then every round here
    for m in ("full_training", "iif", "layerwise_subset"):
        curve = recs[m]["kl_curve"]
        assert [p["round"] for p in curve] == [0, 1, 2] and curve[0] == recs["full_training"]["kl_curve"][0]
        assert curve[0]["kl"] == 0.0 and all(p["kl"] >= 0.0 for p in curve)
    assert "kl_curve" not in recs["base"]
    table = (out / "tables.md").read_text()
    assert "| RM score | RM @ KL" in table and "held-out pair accuracy" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "method" not in line]
    assert rows[0].startswith("| base (untrained)") and len(rows) == len(methods)
    assert (out / "reward_vs_kl_format_shift.png").stat().st_size > 0

    # the cached reward model is the trained one: the stored held-out accuracy again, and not the untrained head
    path = out / "cache" / "reward_model__format_shift"
    tok = real_rl._WORKER.tok
    loaded = rmod.RewardModel(rmod.load_classifier(tiny_folder, adapter=path).eval(), tok)
    fresh = rmod.RewardModel(rmod.load_classifier(tiny_folder).eval(), tok)
    pairs, _ = real_rlhf.rm_pairs(real_rl._WORKER.base, tok, "format_shift", SMALL, RM_SMALL)
    enc = rmod.encode_pairs(tok, pairs["held_out"])
    assert rmod.pair_accuracy(loaded, enc) == acc["all"]
    prompts, chosen, _ = (list(x) for x in zip(*enc))
    assert not loaded.score(prompts, chosen).allclose(fresh.score(prompts, chosen))

    # a re-run trains only what is missing and reads the reward model from the cache
    (out / "raw" / record_name("format_shift", "full_training", None, 0)).unlink()
    runs = []
    run_orig = real_rl.RLWorker.run

    def spy_run(self, *job):
        runs.append(job)
        return run_orig(self, *job)

    monkeypatch.setattr(real_rl.RLWorker, "run", spy_run)
    monkeypatch.setattr(real_rl, "_WORKER", None)
    assert _bench(tiny_folder, out, f"methods={','.join(methods)}") == 0
    assert runs == [("format_shift", "full_training", None, 0)] and len(trained) == 1
    # a reward model made by another model is trained again
    (path / "reward_model.json").write_text(json.dumps({**info, "model": "another-model"}))
    (out / "raw" / record_name("format_shift", "full_training", None, 0)).unlink()
    monkeypatch.setattr(real_rl, "_WORKER", None)
    assert _bench(tiny_folder, out, "methods=full_training") == 0
    assert len(trained) == 2 and json.loads((path / "reward_model.json").read_text())["model"] == tiny_folder


def test_rlhf_tunes_the_learning_rate_on_the_first_seed(tiny_folder, tmp_path, small, monkeypatch, rigged_lr):
    out, seen, trained = tmp_path / "rlhf", rigged_lr(real_rlhf.RLHFWorker, 1e-4), []  # validation prefers 1e-4
    rm_orig = rmod.train_reward_model
    monkeypatch.setattr(rmod, "train_reward_model", lambda *a, **kw: trained.append(1) or rm_orig(*a, **kw))
    assert _bench(tiny_folder, out, "seeds=0,1", "methods=base,full_training", "lrs=5e-4,1e-4") == 0
    assert seen == [(0, 5e-4), (0, 1e-4), (1, 1e-4)] and trained == [1]  # the reward model once, for both seeds
    assert sorted(p.name for p in (out / "raw").glob("*.json")) == sorted(
        [record_name("format_shift", "base", None, s) for s in (0, 1)]
        + [record_name("format_shift", "full_training", k, s) for k, s in ((None, 0), ("lr=0.0001", 0),
                                                                            ("lr=0.0001", 1))])
    rec = json.loads((out / "raw" / record_name("format_shift", "full_training", "lr=0.0001", 1)).read_text())
    assert rec["budget"]["lr"] == 1e-4 and rec["budget"]["value_lr"] == real_rlhf.BUDGET.value_lr
    rows = [line for line in (out / "tables.md").read_text().splitlines() if line.startswith("| FullTraining")]
    assert len(rows) == 1 and "| 0.0001 |" in rows[0] and rows[0].rstrip().endswith("| 2 |")  # the tuning run left out
    # the RM score and the fixed-KL reading come from the chosen runs only
    chosen = [json.loads((out / "raw" / record_name("format_shift", "full_training", "lr=0.0001", s)).read_text())
              for s in (0, 1)]
    row = real_rlhf.summarize(load_records(out))["format_shift"]["full_training"]
    assert row["seeds"] == [0, 1] and row["lr"] == 1e-4
    assert row["rm_score"][0] == pytest.approx(sum(r["rm_score"] for r in chosen) / 2)
    assert row["kl_budget"] == real_rlhf.kl_budget([r["kl_curve"] for r in chosen])


def test_reward_at_a_fixed_kl_on_hand_made_curves():
    def curve(*pts):
        return [{"round": i, "kl": k, "rm_score": r} for i, (k, r) in enumerate(pts)]

    fast = curve((0.0, 1.0), (0.5, 2.0), (1.0, 3.0))
    slow = curve((0.0, 1.0), (0.2, 1.5), (0.4, 1.1))
    back = curve((0.0, 0.0), (0.6, 1.0), (0.3, 2.0))  # the KL falls back: the first crossing counts
    assert real_rlhf.kl_budget([fast, slow, back]) == 0.4
    assert real_rlhf.reward_at_kl(fast, 0.4) == pytest.approx(1.8)
    assert real_rlhf.reward_at_kl(slow, 0.4) == pytest.approx(1.1)
    assert real_rlhf.reward_at_kl(slow, 0.1) == pytest.approx(1.25)
    assert real_rlhf.reward_at_kl(back, 0.45) == pytest.approx(0.75)
    assert real_rlhf.reward_at_kl(slow, 0.5) is None and real_rlhf.reward_at_kl(curve((0.0, 2.0)), 0.0) == 2.0

    def rec(method, seed, c, em=0.0):
        return {"setting": "s", "method": method, "label": method, "knob": None, "seed": seed, "model": "m",
                "paradigm": "rlhf", "target_em": em, "retention_em": 0.5, "val_em": 0.0, "kl": c[-1]["kl"],
                "rm_score": c[-1]["rm_score"], "seconds_per_step": 1.0, "wall_seconds": 2.0, "kl_curve": c,
                "rm_heldout_accuracy": {"all": 0.75}}

    records = [rec("full_training", 0, fast), rec("full_training", 1, curve((0.0, 1.0), (0.8, 3.0))),
               rec("hull", 0, slow), rec("hull", 1, back)]
    warm = {**rec("warm_start", 0, curve((0.0, 1.0)), em=0.1), "kl_curve": None, "rm_score": 1.0}
    rows = real_rlhf.summarize(records + [warm])["s"]
    assert rows["hull"]["kl_budget"] == 0.4 and rows["warm_start"]["rm_at_kl"] is None
    assert rows["full_training"]["rm_at_kl"][0] == pytest.approx((1.8 + 2.0) / 2)
    assert rows["hull"]["rm_at_kl"][0] == pytest.approx((1.1 + 2.0 / 3) / 2)
    text = real_rlhf.verdict(rows)
    assert "(a proxy win): full_training, hull." in text and "at the KL budget: full_training (1.900)" in text
    assert text.startswith("Best Dr method: hull (target EM 0.000, KL 0.350); does not beat full_training (0.000, KL 0.900)")


def test_budget_curve_points_and_help_agree():
    b = real_rlhf.BUDGET
    assert real_rlhf.recipe_of(BenchRealConfig(paradigm="rlhf")) == b
    assert b.eval_every == real_rlhf.curve_every(b.rounds)
    r = real_rlhf.recipe_of(BenchRealConfig(paradigm="rlhf", steps=7, general_batch_size=4, lr=1e-4, kl_coef=0.1))
    assert (r.rounds, r.rollout_batch_size, r.lr, r.kl_coef, r.eval_every) == (7, 4, 1e-4, 0.1, 3)
    # points during a run (the loop's evaluations before the last round), besides round 0 and the end
    during = {n: list(range(real_rlhf.curve_every(n), n, real_rlhf.curve_every(n))) for n in (1, 2, 4, 5, 6, 7, 9)}
    assert during == {1: [], 2: [1], 4: [2], 5: [2, 4], 6: [2, 4], 7: [3, 6], 9: [3, 6]}
    helps = {name: f.metadata["help"] for name, f, _ in leaf_options(BenchRealConfig)}
    assert f"rlhf {b.rounds})" in helps["steps"] and f"rlhf {b.rollout_batch_size})" in helps["general_batch_size"]
    assert f"rlhf {b.lr:.0e})".replace("e-04", "e-4") in helps["lr"] and BenchRealConfig().kl_coef == b.kl_coef
    assert f"{b.target_rollouts} target rollouts a round, {b.target_batch_size} a step" in helps["target_batch_size"]


def test_options_rlhf_does_not_read_are_refused(tmp_path):
    from tests.test_options_read import _other_value

    refused = [name for name, _, _ in leaf_options(BenchRealConfig) if name not in real_rlhf.READ]
    assert "target_batch_size" in refused and "group_size" in refused and "kl_coef" not in refused
    for name in refused:
        config = BenchRealConfig(paradigm="rlhf", output_dir=str(tmp_path))
        hint = typing.get_type_hints(BenchRealConfig)[name]
        setattr(config, name, _other_value(getattr(config, name), hint))
        with pytest.raises(ConfigError, match=f"'{name}'"):
            real.run(config)
    for paradigm in ("sft", "dpo", "rlvr"):  # and the others refuse rlhf's own option
        with pytest.raises(ConfigError, match="'kl_coef'"):
            real.run(BenchRealConfig(paradigm=paradigm, kl_coef=0.2, output_dir=str(tmp_path)))


def test_bad_method_and_warm_start_are_named(tmp_path, capsys):
    assert cli.main(["bench", "real", "paradigm=rlhf", "methods=dsir", f"output_dir={tmp_path}"]) == 2
    assert "'methods'" in capsys.readouterr().err
    assert cli.main(["bench", "real", "paradigm=rlhf", "methods=warm_start", "warm_start=none",
                     f"output_dir={tmp_path}"]) == 2
    assert "needs warm_start=sft" in capsys.readouterr().err
    assert cli.main(["bench", "real", "paradigm=rlhf", "rewrite=true", f"output_dir={tmp_path}"]) == 2
    assert "no rlhf records" in capsys.readouterr().err
