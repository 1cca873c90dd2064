"""Resumable sweeps (``drpost.bench.records``) and the world SFT benchmark on top of them: one record per finished
run, a re-run runs only the missing runs, knobs are chosen on the first seed's validation, tuning-only runs are
marked. The fake runner makes the protocol checks instant; one small real sweep checks the SFT benchmark end to end.
"""

from __future__ import annotations

import json

import pytest
import yaml
from tests.bench.test_quality import tiny_setting

from drpost.bench import quality, records
from drpost.config import ConfigError, parse_config
from drpost.config.bench import BenchRealConfig
from drpost.trainers.sft import SFTRecipe

KNOBS = {"a": [1, 2], "b": [None]}


def fake_runner(out, ran):
    def run_jobs(jobs):
        for setting, method, knob, seed in jobs:
            ran.append((setting, method, knob, seed))
            val = {1: 0.1, 2: 0.3, None: 0.2}[knob]  # knob 2 wins validation
            records.write_record(out, {"setting": setting, "method": method, "knob": knob, "seed": seed,
                                       "val_em": val, "val_loss": 1.0})
    return run_jobs


def test_tuned_sweep_tunes_on_the_first_seed_and_resumes(tmp_path):
    ran: list = []
    recs = records.tuned_sweep(["s"], ["a", "b"], [3, 4], tmp_path, KNOBS.get, fake_runner(tmp_path, ran))
    assert ran == [("s", "a", 1, 3), ("s", "a", 2, 3), ("s", "b", None, 3), ("s", "a", 2, 4), ("s", "b", None, 4)]
    assert len(recs) == 5 and len(list((tmp_path / "raw").glob("*.json"))) == 5
    marked = {(r["method"], r["knob"], r["seed"]): r["tuning_only"] for r in records.mark_tuning(recs)}
    assert marked == {("a", 1, 3): True, ("a", 2, 3): False, ("b", None, 3): False, ("a", 2, 4): False,
                      ("b", None, 4): False}
    # an interrupted sweep: drop two records; the re-run runs exactly those
    (tmp_path / "raw" / records.record_name("s", "a", 2, 4)).unlink()
    (tmp_path / "raw" / records.record_name("s", "a", 1, 3)).unlink()
    ran.clear()
    records.tuned_sweep(["s"], ["a", "b"], [3, 4], tmp_path, KNOBS.get, fake_runner(tmp_path, ran))
    assert ran == [("s", "a", 1, 3), ("s", "a", 2, 4)]


def test_more_seeds_for_a_tuned_directory_tune_where_it_was_tuned(tmp_path):
    """A later invocation that adds seeds (``seeds=[5]``) to a directory tuned on seed 3 runs no tuning on its own
    seeds: they get the knob chosen on the directory's first seed (the first seed of its config.yaml)."""
    ran: list = []
    records.tuned_sweep(["s"], ["a", "b"], [3, 4], tmp_path, KNOBS.get, fake_runner(tmp_path, ran))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"seeds": [3, 4, 5]}))  # as claim_dir merges it
    assert records.tuning_seed(tmp_path, [5]) == 3 and records.tuning_seed(tmp_path / "new", [5]) == 5
    ran.clear()
    recs = records.tuned_sweep(["s"], ["a", "b"], [5], tmp_path, KNOBS.get, fake_runner(tmp_path, ran))
    assert ran == [("s", "a", 2, 5), ("s", "b", None, 5)]  # knob 2 won seed 3's validation
    assert {(r["method"], r["seed"]) for r in recs} == {("a", 5), ("b", 5)}


def test_mark_tuning_while_only_the_tuning_seed_has_run():
    recs = [{"setting": "s", "method": "a", "knob": k, "seed": 0, "val_em": v, "val_loss": 1.0}
            for k, v in ((1, 0.5), (2, 0.4))]
    assert [r["tuning_only"] for r in records.mark_tuning(recs)] == [False, True]


def test_write_record_is_whole_or_absent(tmp_path):
    rec = {"setting": "s", "method": "a", "knob": 0.5, "seed": 1, "x": [1, 2]}
    path = records.write_record(tmp_path, rec)
    assert json.loads(path.read_text()) == rec and not list((tmp_path / "raw").glob("*.tmp"))


def test_quality_sweep_writes_one_record_per_run_and_skips_finished_runs(tmp_path, monkeypatch):
    budget = SFTRecipe(steps=1, eval_every=0)
    calls = []
    real_run_one = quality.run_one

    def counting(setting, name, knob, seed, *a, **kw):
        calls.append((name, knob, seed))
        return real_run_one(setting, name, knob, seed, *a, **kw)

    monkeypatch.setattr(quality, "run_one", counting)
    methods = ["full_training", "layerwise_subset"]
    recs = quality.run_quality(tiny_setting(), methods, [0, 1], budget, n_val=2, out_dir=tmp_path)
    assert len(calls) == 5 and len(recs) == 5  # full_training x 2 seeds; layerwise: 2 knobs on seed 0, then seed 1
    assert sum(r["tuning_only"] for r in recs) == 1
    assert len(list((tmp_path / "raw").glob("*.json"))) == 5
    calls.clear()
    again = quality.run_quality(tiny_setting(), methods, [0, 1], budget, n_val=2, out_dir=tmp_path)
    assert calls == [] and sorted(json.dumps(r, sort_keys=True) for r in again) == \
        sorted(json.dumps(r, sort_keys=True) for r in recs)


def test_less_scores_are_computed_once_per_seed_and_cached_on_disk(tmp_path, monkeypatch):
    from drpost.baselines import less

    budget = SFTRecipe(steps=1, eval_every=0)
    scored = []  # one entry per warm-up checkpoint whose pool cosines were computed
    real_cosines = less.checkpoint_cosines

    def counting(*a, **kw):
        scored.append(1)
        return real_cosines(*a, **kw)

    monkeypatch.setattr(less, "checkpoint_cosines", counting)
    quality.run_quality(tiny_setting(), ["less"], [0], budget, n_val=2, out_dir=tmp_path)
    assert len(scored) == 4  # both knob values share one scoring: 4 checkpoints
    assert len(list((tmp_path / "less").glob("tiny_shift__s0__ck*.json"))) == 4
    first = json.loads((tmp_path / "raw" / records.record_name("tiny_shift", "less", 0.1, 0)).read_text())
    (tmp_path / "raw" / records.record_name("tiny_shift", "less", 0.1, 0)).unlink()
    quality._CTX.clear()  # a new process: only the disk store remains
    quality.run_quality(tiny_setting(), ["less"], [0], budget, n_val=2, out_dir=tmp_path)
    assert len(scored) == 4  # read back, not scored again
    again = json.loads((tmp_path / "raw" / records.record_name("tiny_shift", "less", 0.1, 0)).read_text())
    assert again["target_em"] == first["target_em"] and again["selection_seconds"] == first["selection_seconds"]


def _real(out, *argv):
    return parse_config(BenchRealConfig, [f"output_dir={out}", *argv])


def test_claim_dir_keeps_the_recipe_of_the_records_and_merges_the_run_lists(tmp_path):
    first = _real(tmp_path, "settings=format_shift", "seeds=0,1", "methods=base,less", "steps=20")
    assert records.claim_dir(first, tmp_path, {"workers"}) == (first, True)  # nothing on disk yet: written as given
    records.write_record(tmp_path, {"setting": "format_shift", "method": "base", "knob": None, "seed": 0})
    text = (tmp_path / "config.yaml").read_text()

    with pytest.raises(ConfigError, match="option 'steps'.*steps=20"):
        records.claim_dir(_real(tmp_path, "settings=format_shift", "steps=40"), tmp_path, {"workers"})
    assert (tmp_path / "config.yaml").read_text() == text  # a refused invocation changes nothing

    narrower = _real(tmp_path, "settings=sparse_related", "seeds=2", "methods=less,dsir", "steps=20", "workers=1")
    written, covered = records.claim_dir(narrower, tmp_path, {"workers"})
    assert not covered
    assert written.settings == ["format_shift", "sparse_related"] and written.seeds == [0, 1, 2]
    assert written.methods == ["base", "less", "dsir"] and written.workers == 1  # a free option follows the call
    assert parse_config(BenchRealConfig, ["--config", str(tmp_path / "config.yaml")]) == written

    wider = _real(tmp_path, "settings=format_shift,sparse_related", "seeds=0,1,2", "methods=base,less,dsir",
                  "steps=20")
    assert records.claim_dir(wider, tmp_path, {"workers"})[1]


def test_claim_dir_overwrites_a_config_without_records(tmp_path):
    records.claim_dir(_real(tmp_path, "steps=20"), tmp_path, set())
    written, covered = records.claim_dir(_real(tmp_path, "steps=40", "seeds=5"), tmp_path, set())
    assert covered and yaml.safe_load((tmp_path / "config.yaml").read_text())["steps"] == 40
    assert written.seeds == [5]


def test_the_world_sweep_refuses_another_recipe_for_a_directory_with_records(tmp_path, capsys):
    from drpost import cli
    from drpost.config import BenchConfig, save_resolved

    save_resolved(parse_config(BenchConfig, ["steps=3", f"output_dir={tmp_path}"]), tmp_path)
    records.write_record(tmp_path, {"setting": "format_shift", "method": "full_training", "knob": None, "seed": 0})
    argv = ["bench", "quality", f"output_dir={tmp_path}", "settings=format_shift", "methods=full_training", "seeds=0"]
    assert cli.main([*argv, "steps=5"]) == 2
    assert "option 'steps'" in capsys.readouterr().err
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["steps"] == 3
