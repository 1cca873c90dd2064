"""The SFT quality benchmark (``drpost.bench.quality``): the given seeds are the seeds run, and each seed draws its
own data (pool, targets, test set). A tiny setting and 2 training steps; never asserts a time or a quality level.
"""

from __future__ import annotations

import dataclasses

from drpost.bench import quality
from drpost.config import BenchConfig
from drpost.trainers.sft import SFTRecipe
from drpost.world import settings as world_settings


def tiny_setting():
    return dataclasses.replace(world_settings.SETTINGS["distribution_shift"], name="tiny_shift", n_pool=48,
                               n_target=4, n_val=4, n_test=4, n_retention=2)


def test_build_setting_redraws_everything_with_the_seed():
    s = tiny_setting()
    a, b, a2 = world_settings.build_setting(s, 5), world_settings.build_setting(s, 6), world_settings.build_setting(s, 5)
    for split in ("general", "target_train", "target_val", "target_test"):
        assert getattr(a, split) == getattr(a2, split)  # deterministic in the seed
        assert getattr(a, split) != getattr(b, split), split  # and redrawn by it
    assert a.retention != b.retention


def test_run_uses_the_given_seeds(monkeypatch, tmp_path):
    seen = {}

    def fake_run_quality(setting, methods, seeds, budget, **kw):
        seen.setdefault("seeds", []).append(list(seeds))
        return []

    monkeypatch.setattr(quality, "run_quality", fake_run_quality)
    monkeypatch.setattr(quality, "write_results", lambda records, out, command: {})
    monkeypatch.setattr(quality, "markdown_table", lambda table, command: "")
    config = BenchConfig(seeds=[5, 6], settings=["format_shift"], methods=["full_training"],
                         output_dir=str(tmp_path))
    quality.run(config)
    assert seen["seeds"] == [[5, 6]]


def test_a_narrower_rerun_reports_every_run_on_disk(monkeypatch, tmp_path):
    """Adding a method to a results directory keeps the other methods in its tables, and names the command that
    made all of them (the directory's config.yaml, which lists the union) instead of the narrower invocation."""
    from drpost import cli
    from drpost.bench.records import write_record

    def fake_run_quality(setting, methods, seeds, budget, out_dir=None, **kw):
        for m in methods:
            for s in seeds:
                write_record(out_dir, {"setting": setting, "method": m, "knob": None, "seed": s})
        return []

    reported = []
    monkeypatch.setattr(quality, "run_quality", fake_run_quality)
    monkeypatch.setattr(quality, "write_results", lambda records, out, command: reported.append((records, command)))
    monkeypatch.setattr(quality, "markdown_table", lambda table, command: "")
    first = BenchConfig(seeds=[0], settings=["format_shift"], methods=["full_training"], output_dir=str(tmp_path))
    quality.run(first)
    assert {r["method"] for r in reported[-1][0]} == {"full_training"}
    assert reported[-1][1].startswith("drpost bench quality")  # outside the CLI: the benchmark's own name
    quality.run(dataclasses.replace(first, methods=["hull"]))
    records, command = reported[-1]
    assert {r["method"] for r in records} == {"full_training", "hull"}
    assert command == f"drpost bench quality --config {tmp_path / 'config.yaml'}"
    key, again, _ = cli.parse_args(command.split()[1:])  # the command it names parses to the union
    assert key == "bench quality" and again.methods == ["full_training", "hull"]


def test_each_seed_trains_on_its_own_data(monkeypatch):
    built = []
    real = world_settings.build_setting

    def spy(setting, seed=0):
        data = real(setting, seed)
        built.append((seed, [e["prompt"] for e in data.target_train]))
        return data

    monkeypatch.setattr(world_settings, "build_setting", spy)
    ctx: dict = {}
    budget = SFTRecipe(steps=2, eval_every=0)
    recs = [quality.run_one(tiny_setting(), "full_training", None, s, budget, n_val=2, _ctx=ctx) for s in (5, 6, 5)]
    assert [r["seed"] for r in recs] == [5, 6, 5]
    assert [s for s, _ in built] == [5, 6]  # built once per seed, reused after
    assert built[0][1] != built[1][1]


def test_run_refuses_options_it_does_not_read(tmp_path):
    import pytest

    from drpost.config import ConfigError, RegularizerConfig

    with pytest.raises(ConfigError, match=r"'regularizer.method' is not used by drpost bench quality"):
        quality.run(BenchConfig(regularizer=RegularizerConfig(method="hull"), output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"option 'settings': unknown world setting 'format_shfit'"):
        quality.run(BenchConfig(settings=["format_shfit"], output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"option 'methods': 'mixing' not available for --paradigm rlvr"):
        quality.run(BenchConfig(paradigm="rlvr", methods=["hull", "mixing"], output_dir=str(tmp_path)))


def test_rewrite_rebuilds_a_results_directory_keeping_command_and_notes(tmp_path, capsys):
    import shutil
    from pathlib import Path

    from drpost import cli

    repo = Path(__file__).resolve().parents[2]
    for paradigm in ("rlvr", "sft"):
        src = repo / "results" / paradigm
        dst = tmp_path / paradigm
        shutil.copytree(src, dst)
        old = (dst / "README.md").read_text()
        for png in dst.glob("*.png"):
            png.unlink()
        code = cli.main(["bench", "quality", "--paradigm", paradigm, "rewrite=true", f"output_dir={dst}"])
        assert code == 0
        new = (dst / "README.md").read_text()
        assert new.splitlines()[:6] == old.splitlines()[:6]  # note above the title, title and command kept
        assert old.rstrip().splitlines()[-1] == new.rstrip().splitlines()[-1]  # the notes (or verdict) kept
        assert list(dst.glob("*.png"))
    capsys.readouterr()


def test_every_bench_method_name_trains():
    """The methods offered by the config's BenchMethod list that are not in the default comparison still run."""
    ctx: dict = {}
    budget = SFTRecipe(steps=1, eval_every=0)
    for name in ("cone", "span", "halfspace"):
        r = quality.run_one(tiny_setting(), name, None, 0, budget, n_val=2, _ctx=ctx)
        assert r["method"] == name and r["skipped_steps"] == 0


def test_report_names_the_best_dr_method_that_keeps_retention_and_the_sampler_cost():
    """The README table carries ms/step and the sampler's ms/step; the retention verdict only counts Dr methods
    whose retention is within 0.02 of FullTraining's."""
    from drpost.bench.quality_report import markdown_table, retention_verdict

    def row(label, t, r, sampler=None):
        return {"label": label, "knob": None, "target_em": (t, 0.01), "target_loss": (1.0, 0.0),
                "retention_em": (r, 0.0), "target_family_weight": None, "wall_seconds": 10.0, "step_ms": 100.0,
                "sampler_ms_per_step": sampler}

    by = {"full_training": row("FullTraining", 0.10, 0.30), "dsir": row("DSIR", 0.20, 0.08),
          "hull": row("Hull", 0.25, 0.20), "guided_hull": row("Guided+Hull", 0.15, 0.29, sampler=4.2)}
    sel = (0.20, 0.01)
    text = retention_verdict(by, sel)
    assert "Guided+Hull (0.150" in text and "does not beat" in text  # Hull's 0.25 is dropped: retention 0.20 < 0.28
    assert "within noise" not in text  # 0.05 apart, s.e. of the difference 0.014
    by["guided_hull"]["target_em"] = (0.24, 0.01)
    assert "Guided+Hull (0.240" in retention_verdict(by, sel) and " beats " in retention_verdict(by, sel)
    by["guided_hull"]["target_em"] = (0.21, 0.01)  # 0.01 ahead, s.e. of the difference 0.014: a tie, said so
    assert " beats the best data-selection baseline (0.200) (within noise: difference +0.010, its s.e. 0.014)." \
        in retention_verdict(by, sel)
    md = markdown_table({"s": by}, "cmd")
    assert "| ms/step | sampler ms/step |" in md and "| 100 | 4.2 |" in md and "| 100 |  |" in md
    assert "Best Dr method: Hull (0.250) beats the best data-selection baseline (0.200)." in md
    by["guided_hull"]["retention_em"] = (0.1, 0.0)
    assert retention_verdict(by, sel).startswith("No Dr method keeps retention")
