"""``drpost bench real`` and ``drpost demo --model``: the real-model path on a small local copy (a tiny Llama with a
byte-level BPE tokenizer and a ChatML template, converted from a GGUF the test writes), never the real model.

Checks: one record per run, a re-run skips finished runs, knob tuning on the first seed only, ``base`` rows, the
report (summary.json, tables.md, one plot per setting), the Pareto front, and the clear error for a missing model.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from drpost import cli
from drpost.bench import real, real_report

SMALL = real.RealSizes(n_pool=120, n_val=6, n_test=8, n_retention=2, max_new_tokens=4)


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(real, "REAL_SIZES", SMALL)
    monkeypatch.setattr(real, "REAL_KNOBS", {})  # the fixed knobs, unless a test tunes some


def _bench(folder, out, *extra):
    return cli.main(["bench", "real", f"model={folder}", f"output_dir={out}", "settings=sparse_related",
                     "workers=1", "steps=2", *extra])


def test_sweep_writes_one_record_per_run_and_resumes(tiny_folder, tmp_path, small, monkeypatch, capsys):
    out = tmp_path / "r"
    assert _bench(tiny_folder, out, "seeds=0,1", "methods=base,full_training,layerwise_subset") == 0
    names = sorted(p.name for p in (out / "raw").glob("*.json"))
    assert names == sorted(real.record_name("sparse_related", m, real.REAL_FIXED.get(m), s)
                           for m in ("base", "full_training", "layerwise_subset") for s in (0, 1))
    rec = json.loads((out / "raw" / real.record_name("sparse_related", "full_training", None, 1)).read_text())
    assert rec["model"] == tiny_folder and rec["paradigm"] == "sft" and rec["budget"]["steps"] == 2
    assert rec["budget"]["finetuning"] == "lora" and rec["seconds_per_step"] > 0
    assert rec["device"] == "cpu" or rec["device"].startswith("cuda (")  # device=auto, named in the record
    for key in ("target_em", "val_em", "retention_em"):
        assert 0.0 <= rec[key] <= 1.0
    assert rec["target_family"] not in rec["retention_by_family"]  # retention: held-out families only
    base = json.loads((out / "raw" / real.record_name("sparse_related", "base", None, 0)).read_text())
    assert base["budget"] is None and base["seconds_per_step"] is None
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 6
    text = (out / "tables.md").read_text()
    assert "base (untrained)" in text and "LayerWiseSubset" in text and "Pareto" in text
    assert (out / "target_vs_retention_sparse_related.png").stat().st_size > 0

    # a second run (one seed more) trains only what is missing
    calls = []
    orig = real.Worker.run

    def spy(self, *job, **kw):
        calls.append(job)
        return orig(self, *job, **kw)

    monkeypatch.setattr(real.Worker, "run", spy)
    assert _bench(tiny_folder, out, "seeds=0,1,2", "methods=base,full_training,layerwise_subset") == 0
    assert sorted(calls) == sorted(("sparse_related", m, real.REAL_FIXED.get(m), 2)
                                   for m in ("base", "full_training", "layerwise_subset"))

    # the directory keeps its recipe: another steps is refused by name before anything trains ...
    calls.clear()
    assert _bench(tiny_folder, out, "seeds=0", "methods=base", "steps=3") == 2
    assert "option 'steps'" in capsys.readouterr().err and not calls
    # ... and a narrower invocation adds to its config.yaml instead of shrinking it; the tables name that file
    assert _bench(tiny_folder, out, "seeds=0", "methods=base") == 0 and not calls
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["seeds"] == [0, 1, 2] and saved["methods"] == ["base", "full_training", "layerwise_subset"]
    assert saved["steps"] == 2
    assert f"drpost bench real --config {out / 'config.yaml'}" in (out / "tables.md").read_text()


def test_knobs_are_tuned_on_the_first_seed_only(tiny_folder, tmp_path, small, monkeypatch):
    monkeypatch.setattr(real, "REAL_KNOBS", {"layerwise_subset": [0.25, 0.5]})
    out = tmp_path / "t"
    assert _bench(tiny_folder, out, "seeds=0,1", "methods=layerwise_subset") == 0
    recs = real.load_records(out)
    assert sorted(r["knob"] for r in recs if r["seed"] == 0) == [0.25, 0.5]
    chosen = real.best_knobs(recs, "sparse_related", 0)["layerwise_subset"]
    assert [r["knob"] for r in recs if r["seed"] == 1] == [chosen]
    table = real_report.summarize(recs)["sparse_related"]["layerwise_subset"]
    assert table["knob"] == chosen and table["seeds"] == [0, 1]  # the losing knob is a tuning-only run


def test_the_default_grids_hold_the_fixed_knobs():
    # the grids are the world benchmark's, and each holds the value it chose, so the fixed-knob runs stay tuning runs
    for m in real.REAL_METHODS:
        if m in real.REAL_KNOBS:
            assert real.REAL_FIXED[m] in real.REAL_KNOBS[m] and len(real.REAL_KNOBS[m]) >= 2


def test_pareto_front():
    pts = {"a": (0.5, 0.1), "b": (0.2, 0.3), "c": (0.2, 0.2), "d": (0.5, 0.1), "e": (0.1, 0.3)}
    assert real_report.pareto_front(pts) == {"a", "b", "d"}


def test_missing_model_says_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DRPOST_CACHE", str(tmp_path / "cache"))
    code = cli.main(["bench", "real", f"output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert code == 2 and "make model" in err and "smollm2-135m-instruct" in err


def test_bad_setting_and_method_are_named(tmp_path, capsys):
    assert cli.main(["bench", "real", "settings=nope", f"output_dir={tmp_path}"]) == 2
    assert "'settings'" in capsys.readouterr().err
    assert cli.main(["bench", "real", "methods=nope", f"output_dir={tmp_path}"]) == 2
    assert "'methods'" in capsys.readouterr().err


def test_device_is_checked_and_named(tiny_folder, tmp_path, capsys):
    assert cli.main(["bench", "real", "device=gpu", f"output_dir={tmp_path}"]) == 2
    assert "'device'" in capsys.readouterr().err
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: device=cuda is accepted here")
    assert _bench(tiny_folder, tmp_path / "c", "seeds=0", "methods=full_training", "device=cuda") == 2
    err = capsys.readouterr().err
    assert "'device'" in err and "CUDA is not available" in err
    assert not (tmp_path / "c" / "raw").exists() or not list((tmp_path / "c" / "raw").glob("*.json"))


def test_real_demo_prints_base_and_methods(tiny_folder, tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli.main(["demo", "--model", tiny_folder, "steps=2", "methods=layerwise_subset", f"output_dir={out}"])
    assert code == 0
    text = capsys.readouterr().out
    assert "base (untrained)" in text and "LayerWiseSubset" in text and "retention EM" in text
    records = json.loads((out / "metrics.json").read_text())
    assert [r["method"] for r in records] == ["base", "layerwise_subset"]
    assert cli.main(["demo", "--model", tiny_folder, "model.size=micro", f"output_dir={out}"]) == 2
    assert "'model.size'" in capsys.readouterr().err


def test_default_methods_agree_and_have_their_knobs():
    from drpost.bench.quality import METHODS
    from drpost.config import BenchRealConfig

    assert BenchRealConfig().methods == real.REAL_METHODS
    for m in real.REAL_METHODS[1:]:
        assert m in METHODS
        if METHODS[m][2] is not None:  # a method with a knob runs with a fixed or a tuned value, never None
            assert real.knob_values(m) != [None], m


def test_less_jobs_of_one_pool_run_in_one_task():
    jobs = [("fs", "less", 0.02, 0), ("fs", "dsir", 0.02, 0), ("fs", "less", 0.1, 0), ("sr", "less", 0.02, 0),
            ("fs", "less", 0.02, 1), ("fs", "dsir", 0.1, 0), ("fs", "less_prefilter_hull", 0.1, 0),
            ("fs", "dsir_prefilter_hull", 0.1, 0)]
    assert real.tasks(jobs) == [
        [("fs", "less", 0.02, 0), ("fs", "less", 0.1, 0), ("fs", "less_prefilter_hull", 0.1, 0)],
        [("fs", "dsir", 0.02, 0)], [("sr", "less", 0.02, 0)], [("fs", "less", 0.02, 1)], [("fs", "dsir", 0.1, 0)],
        [("fs", "dsir_prefilter_hull", 0.1, 0)]]


def test_less_scores_the_pool_once_per_seed_and_resumes_by_checkpoint(tiny_folder, tmp_path, small, monkeypatch):
    out = tmp_path / "r"
    assert _bench(tiny_folder, out, "seeds=0", "methods=less") == 0
    files = sorted((out / "less").glob("*.json"))
    assert [f.name for f in files] == [f"sparse_related__s0__ck{c}.json" for c in range(4)]
    saved = json.loads(files[0].read_text())
    assert len(saved["cosines"]) == SMALL.n_pool and saved["key"]["seed"] == 0 and saved["key"]["proj_dim"] is None
    name = real.record_name("sparse_related", "less", real.REAL_FIXED["less"], 0)
    rec = json.loads((out / "raw" / name).read_text())
    assert rec["selection_seconds"] > 0

    # stopped while scoring checkpoint 3: the rerun scores checkpoint 3 only and trains again
    (out / "raw" / name).unlink()
    files[3].unlink()
    before = {f.name: f.stat().st_mtime_ns for f in files[:3]}
    monkeypatch.setattr(real, "_WORKER", None)  # a new process: no scores kept in memory
    assert _bench(tiny_folder, out, "seeds=0", "methods=less") == 0
    assert files[3].exists() and (out / "raw" / name).exists()
    assert {f.name: f.stat().st_mtime_ns for f in files[:3]} == before
