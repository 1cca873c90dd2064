"""``drpost bench trl``: a micro run through the CLI writes trl.json, summary.md and ratios.png with one row per trainer
x variant and positive finite ratios; bad option values are refused naming the option (before any training).
Wall-clock numbers are never asserted."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("trl")

from drpost import cli  # noqa: E402
from drpost.config import BENCH_CONFIGS, ConfigError, leaf_options  # noqa: E402

TRAINERS = ("sft", "dpo", "grpo")
VARIANTS = ("plain", "plain_union", "global_subset", "layerwise_subset")


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trl")
    code = cli.main(["bench", "trl", "micro=true", "threads=1", "clock=cpu", f"output_dir={out}"])
    assert code == 0
    return out


def test_micro_run_writes_a_row_per_trainer_and_variant(micro_run):
    for name in ("trl.json", "summary.md", "ratios.png", "config.yaml"):
        assert (micro_run / name).is_file(), name
    res = json.loads((micro_run / "trl.json").read_text())
    assert "partial" not in res and res["config"]["micro"] and res["settings"]["hidden"] == 64
    assert res["machine"]["clock"] == "cpu" and res["machine"]["torch_threads"] == 1
    rows = {(r["trainer"], r["variant"]): r for r in res["table"]}
    assert set(rows) == {(k, v) for k in TRAINERS for v in VARIANTS}
    for row in rows.values():
        for clock in ("wall", "cpu"):
            assert math.isfinite(row[f"{clock}_ratio"]) and row[f"{clock}_ratio"] > 0
            assert row[f"{clock}_s"] > 0 and len(row[f"{clock}_round_ratios"]) == row["rounds"] == 1
    for k in TRAINERS:
        assert rows[(k, "plain")]["cpu_ratio"] == pytest.approx(1.0)
        assert rows[(k, "plain_union")]["cpu_union_ratio"] == pytest.approx(1.0)
        for v in VARIANTS:  # the two ratios share the variant's median
            r = rows[(k, v)]
            assert r["cpu_ratio"] / r["cpu_union_ratio"] == pytest.approx(rows[(k, "plain_union")]["cpu_ratio"])
    # every run kept its per-step timings: micro = 2 steps, 1 warm-up
    assert len(res["runs"]) == len(TRAINERS) * len(VARIANTS)
    assert all(len(r["steps_wall_s"]) == len(r["steps_cpu_s"]) == 2 for r in res["runs"])
    md = (micro_run / "summary.md").read_text()
    head = md.splitlines()[2]
    assert head.startswith("Command: `") and "drpost bench trl" in head and "micro=true" in head
    for k in TRAINERS:
        for v in VARIANTS:
            assert f"| {k} | {v} |" in md


def test_the_union_batch_adds_the_adapters_target_rows():
    from drpost.bench import trl

    assert trl.union_batch("sft", 8) == 9 and trl.union_batch("dpo", 8) == 9
    assert trl.union_batch("grpo", 8) == 8 + trl.GENERATIONS  # one target prompt's completions
    assert trl.settings(BENCH_CONFIGS["trl"]())["variants"][:2] == ["plain", trl.UNION]


@pytest.mark.parametrize("argv, option", [
    (["hidden=130"], "hidden"),  # 2 heads of 65 dims
    (["vocab=100"], "vocab"),  # fewer rows than the tokenizer's 259 tokens
    (["steps=3", "warmup=3"], "warmup"),
    (["grpo_steps=1"], "warmup"),  # warm-up 1 leaves no timed GRPO step
    (["batch=6"], "batch"),  # GRPO: a multiple of 4 completions
    (["trainers=sft,sft"], "trainers"),
    (["trainers=ppo"], "trainers"),
    (["clock=gpu"], "clock"),
    (["micro=true", "hidden=128"], "hidden"),  # micro sets the sizes itself
    (["micro=true", "repeats=3"], "repeats"),
])
def test_bad_values_are_refused_naming_the_option(argv, option, tmp_path, capsys):
    code = cli.main(["bench", "trl", f"output_dir={tmp_path / 'o'}", *argv])
    err = capsys.readouterr().err
    assert code == 2 and f"'{option}'" in err, err
    assert not (tmp_path / "o" / "trl.json").exists()


def test_every_option_changes_the_run_or_is_refused():
    from drpost.bench import trl

    names = {n for n, _, _ in leaf_options(BENCH_CONFIGS["trl"])}
    assert trl.READ == names  # a new option must be read (or left out of READ, and so refused)
    cfg = BENCH_CONFIGS["trl"](micro=True, layers=2)
    with pytest.raises(ConfigError, match="'layers'"):
        trl.settings(cfg)


def test_the_command_line_is_reconstructed_from_the_options(monkeypatch):
    from drpost.bench import trl

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg = BENCH_CONFIGS["trl"](trainers=["sft", "dpo"], grpo_steps=5, clock="cpu")
    assert trl.command_line(cfg) == "drpost bench trl trainers=sft,dpo grpo_steps=5 clock=cpu"
