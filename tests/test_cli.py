"""The drpost command line: --help of every subcommand, parsing, and lazy dispatch (nothing is trained here)."""

from __future__ import annotations

import sys
import types

import pytest
import yaml

from drpost import cli
from drpost.config import CONFIGS, BenchConfig, SFTConfig, leaf_options


def run_main(argv, capsys):
    """(exit code, stdout, stderr) of cli.main, whether it returns or raises SystemExit."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command", list(CONFIGS))
def test_every_subcommand_help(command, capsys):
    code, out, _ = run_main([command, "--help"], capsys)
    assert code == 0
    assert f"usage: drpost {command}" in out
    for name, _f, _ in leaf_options(CONFIGS[command]):
        assert f"  {name}:" in out
    assert "regularizer.method" in out and "layerwise_subset" in out  # a field and its default
    assert "Feasible set" in out  # help text


def test_help_wins_over_other_args(capsys):
    code, out, _ = run_main(["sft", "regularizer.method=nonsense", "-h"], capsys)
    assert code == 0 and "usage: drpost sft" in out
    code, out, _ = run_main(["bench", "--help"], capsys)
    assert code == 0 and "quality,system" in out and "paradigm" in out


def test_top_level_help_and_usage(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0 and all(c in out for c in CONFIGS)
    code, out, _ = run_main([], capsys)
    assert code == 2 and "usage: drpost" in out


def test_unknown_command_suggests(capsys):
    code, _, err = run_main(["stf"], capsys)
    assert code == 2 and "unknown command 'stf'" in err and "did you mean 'sft'" in err


def test_parse_args_resolves_config(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"regularizer": {"method": "hull"}, "optim": {"lr": 1e-3}}))
    key, config, print_config = cli.parse_args(["sft", "--config", str(f), "optim.lr=1e-4", "--steps", "5"])
    assert key == "sft" and isinstance(config, SFTConfig) and not print_config
    assert config.regularizer.method == "hull" and config.optim.lr == 1e-4 and config.steps == 5


def test_bench_positional_and_paradigm():
    key, config, _ = cli.parse_args(["bench", "system", "--quick", "seq_lengths=32,64"])
    assert key == "bench system" and not isinstance(config, BenchConfig)  # the system benchmark's own options
    assert config.kind == "system" and config.quick and config.seq_lengths == [32, 64]
    key, config, _ = cli.parse_args(["bench", "quality", "--paradigm=dpo"])
    assert key == "bench quality" and config.paradigm == "dpo"


@pytest.mark.parametrize("argv,fragment", [
    (["bench"], "quality, system, meso, real or trl"),
    (["bench", "--paradigm", "sft"], "quality, system, meso, real or trl"),
    (["bench", "speed"], "unknown benchmark"),
    (["bench", "quality", "--paradigm", "ppo"], "paradigm"),
    (["sft", "regularizer.metod=hull"], "did you mean 'regularizer.method'"),
    (["dpo", "dpo.beta=-1"], "dpo.beta"),
])
def test_usage_errors_exit_2_with_message(argv, fragment, capsys):
    code, _, err = run_main(argv, capsys)
    assert code == 2 and fragment in err and err.startswith("drpost")


def test_print_config_does_not_run(capsys, tmp_path):
    code, out, _ = run_main(["rlvr", "--print-config", "grpo.group_size=4", f"output_dir={tmp_path / 'r'}"], capsys)
    assert code == 0 and yaml.safe_load(out)["grpo"]["group_size"] == 4
    assert not (tmp_path / "r").exists()


def test_runner_table_is_explicit_and_complete():
    assert {"demo", "sft", "dpo", "rlhf", "rlvr", "bench quality", "bench system", "bench meso"} <= set(cli.RUNNERS)
    assert all(":" in target and target.startswith("drpost.") for target in cli.RUNNERS.values())


def test_missing_runner_module_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(cli.RUNNERS, "sft", "drpost.trainers.no_such_trainer:run")
    code, _, err = run_main(["sft", f"output_dir={tmp_path / 'o'}"], capsys)
    assert code == 2 and "not available" in err and "drpost.trainers.no_such_trainer" in err


def test_missing_dependency_is_named(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(cli.RUNNERS, "sft", "drpost_fake_runner_dep:run")

    def fake_import(name):
        raise ModuleNotFoundError("No module named 'trl'", name="trl")

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    code, _, err = run_main(["sft", f"output_dir={tmp_path / 'o'}"], capsys)
    assert code == 2 and "'trl'" in err and "not installed" in err


def test_dispatch_calls_run_with_config_and_writes_resolved_config(monkeypatch, capsys, tmp_path):
    seen = {}
    module = types.ModuleType("drpost_test_fake_runner")

    def run(config):
        seen["config"] = config
        return 0

    module.run = run
    monkeypatch.setitem(sys.modules, "drpost_test_fake_runner", module)
    monkeypatch.setitem(cli.RUNNERS, "sft", "drpost_test_fake_runner:run")
    out_dir = tmp_path / "run"
    code, _, _ = run_main(["sft", f"output_dir={out_dir}", "regularizer.method=cone"], capsys)
    assert code == 0 and seen["config"].regularizer.method == "cone"
    assert yaml.safe_load((out_dir / "config.yaml").read_text())["regularizer"]["method"] == "cone"


def test_help_into_a_closed_pipe_exits_quietly():
    """``drpost sft --help | head -1``: the reader leaves early; no BrokenPipeError traceback, exit code 0."""
    import subprocess

    p = subprocess.Popen([sys.executable, "-m", "drpost.cli", "sft", "--help"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # before the child prints: its first write meets a closed pipe
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and "BrokenPipeError" not in err and "Traceback" not in err, err
