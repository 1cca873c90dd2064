"""Smoke test of the system benchmark machinery (drpost.bench.system): one micro configuration, one repeat.

Checks that the files and JSON keys exist; never asserts a time.
"""

import json

import pytest
import torch

from drpost.bench import system


def test_micro_grid_writes_files_and_keys(tmp_path):
    res = system.run_system_bench(tmp_path, micro=True, repeats=1, log=lambda *a: None)
    for f in ("system.json", "metrics.json", "summary.md", "breakdown.png", "crossovers.png"):
        assert (tmp_path / f).is_file() and (tmp_path / f).stat().st_size > 0, f
    data = json.loads((tmp_path / "system.json").read_text())
    assert {"machine", "settings", "cases", "crossovers", "goals", "wall_s"} <= set(data)
    case = data["cases"][0]
    assert {"config", "params", "standard_s", "methods", "scoring_check"} <= set(case)
    assert "standard" in case["methods"] and "layerwise/one_pass/auto" in case["methods"]
    row = case["methods"]["layerwise/one_pass/auto"]
    assert {"ratio", "ratio_q25", "ratio_q75", "components_s", "floor_ratio", "over_floor", "held_back_by"} <= set(row)
    assert set(row["components_s"]) == set(system.COMPONENTS)
    # counted FLOPs (drpost.bench.system.flops): full_training runs the standard step's products; the two subset
    # sets the same scoring and assembly where their choices agree (LayerWise streams blocks it scores direct:
    # geometry/stream.py); the rate ratio is what the time ratio adds to the FLOP ratio
    rows = case["methods"]
    assert rows["standard"]["gflop"] > 0 and "mm" in rows["standard"]["gflop_by_op"]
    assert rows["full_training"]["gflop"] == pytest.approx(rows["standard"]["gflop"], rel=1e-9)
    same = rows["global/one_pass/auto"]["scoring_choices"] == row["scoring_choices"] and not row["streamed_blocks"]
    assert (rows["global/one_pass/auto"]["gflop"] == pytest.approx(row["gflop"], rel=1e-9)) == same
    assert row["flop_ratio"] * row["rate_ratio"] == pytest.approx(row["ratio"])
    assert "FLOP ratio" in (tmp_path / "summary.md").read_text()
    assert {"m_sweep", "T_sweep"} <= set(data["crossovers"])
    assert {"analytic_m_star", "measured_m_star"} <= set(data["crossovers"]["m_sweep"])
    assert "Command:" in (tmp_path / "summary.md").read_text()
    assert res["cases"][0]["config"]["size"] == "micro"
    machine = data["machine"]  # the record drpost bench trl writes too (drpost.bench.machine)
    assert {"cpu_model", "native_bf16", "transformers", "torch_threads", "gemm_gflops"} <= set(machine)
    assert machine["device"] == "cpu" or machine["device"].startswith("cuda")


def test_run_accepts_a_config_object_or_dict(tmp_path):
    class Cfg:
        output_dir = str(tmp_path / "a")
        micro = True
        repeats = 1

    assert system.run(Cfg()) == 0
    assert (tmp_path / "a" / "system.json").is_file()
    assert system.run({"out_dir": str(tmp_path / "b"), "micro": True, "repeats": 1}) == 0
    assert (tmp_path / "b" / "summary.md").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_a_cuda_device_without_cuda_is_refused_by_name(tmp_path, capsys):
    from drpost import cli

    assert cli.main(["bench", "system", "micro=true", "device=cuda", f"output_dir={tmp_path}"]) == 2
    assert "'device'" in capsys.readouterr().err and not (tmp_path / "system.json").exists()


def test_seq_lengths_and_scorings_change_the_run(tmp_path):
    res = system.run_system_bench(tmp_path, micro=True, repeats=1, log=lambda *a: None, seq_lengths=[8, 12],
                                  scorings=["auto", "direct"])
    assert [c["config"]["T"] for c in res["cases"]] == [8, 12]
    assert res["crossovers"]["T_sweep"]["T"] == [8, 12]
    names = set(res["cases"][0]["methods"])
    assert "layerwise/one_pass/direct" in names and "layerwise/one_pass/auto" in names
    assert not any(n.endswith(("full_ghost", "reduced_ghost", "compress")) for n in names)
    assert {"standard", "full_training", "torch.func vmap (layerwise topk)"} <= names


def test_cli_bench_system_has_its_own_options(capsys):
    from drpost import cli
    from drpost.config import BenchSystemConfig

    with pytest.raises(SystemExit):
        cli.main(["bench", "system", "--help"])
    sys_help = capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["bench", "quality", "--help"])
    quality_help = capsys.readouterr().out
    assert sys_help != quality_help and "usage: drpost bench system" in sys_help
    assert "  seq_lengths:" in sys_help and "  scorings:" in sys_help and "paradigm" not in sys_help
    assert "seq_lengths" not in quality_help
    key, config, _ = cli.parse_args(["bench", "system", "micro=true", "seq_lengths=8,16", "scorings=auto"])
    assert key == "bench system" and isinstance(config, BenchSystemConfig)
    assert config.seq_lengths == [8, 16] and config.scorings == ["auto"]
    assert cli.main(["bench", "system", "--paradigm", "sft"]) == 2  # a quality option is refused by name


def test_cli_bench_meso_options_and_errors(capsys):
    from drpost import cli
    from drpost.config import BenchMesoConfig

    with pytest.raises(SystemExit):
        cli.main(["bench", "meso", "--help"])
    out = capsys.readouterr().out
    assert "usage: drpost bench meso" in out and "  runs_dir:" in out and "  seq_lengths:" not in out
    key, config, _ = cli.parse_args(["bench", "meso", "seeds=3,4", "steps=7"])
    assert key == "bench meso" and isinstance(config, BenchMesoConfig) and config.seeds == [3, 4]
    assert cli.main(["bench", "meso", "setting=format_shfit", "output_dir=/nonexistent/x"]) == 2
    assert "did you mean 'format_shift'" in capsys.readouterr().err


def test_cpu_clock_counts_process_time_and_is_recorded(tmp_path, monkeypatch):
    """``clock=cpu``: every CPU timing reads ``time.process_time`` (not the wall clock), the choice is recorded,
    and the benchmark leaves the wall clock in place afterwards; a bad value is refused by name."""
    import time

    from drpost.bench.system import cases

    calls = {"cpu": 0}
    real = time.process_time

    def counted():
        calls["cpu"] += 1
        return real()

    monkeypatch.setattr(time, "process_time", counted)
    res = system.run(type("C", (), {"output_dir": str(tmp_path), "micro": True, "repeats": 1, "clock": "cpu"})())
    assert res == 0 and calls["cpu"] > 20
    saved = json.loads((tmp_path / "system.json").read_text())
    assert saved["machine"]["clock"] == "cpu" and cases.now.__doc__
    # the regularizer's stage timings ran on the same clock: every Dr row's components add up to CPU seconds
    # no larger than the process used, and the wall clock is back in place afterwards
    from drpost.geometry.step_geometry import STAGE_CLOCK

    assert STAGE_CLOCK["fn"] is time.perf_counter
    seen = []
    monkeypatch.setattr(time, "process_time", lambda: (seen.append(1), real())[1])
    cases.use_clock("cpu")
    try:
        assert STAGE_CLOCK["fn"] is time.process_time
        STAGE_CLOCK["fn"]()
        assert seen
    finally:
        cases.use_clock("wall")
    with pytest.raises(ValueError, match="clock"):
        cases.use_clock("gpu")


def test_bf16_precision_runs_every_method_under_autocast(tmp_path, monkeypatch):
    """``precision=bf16``: the standard step and every regularized step run under bf16 autocast (the GEMMs see
    bf16 operands), the torch.func anchor is left out, and the choice is recorded."""
    from drpost.bench.system import cases

    seen = []
    real = torch.nn.functional.linear

    def linear(x, w, b=None):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    res = system.run_system_bench(tmp_path, micro=True, repeats=1, log=lambda *a: None, precision="bf16",
                                  scorings=["auto"])
    names = set(res["cases"][0]["methods"])
    assert res["settings"]["precision"] == "bf16" and "standard" in names and "global/one_pass/auto" in names
    assert not any(n.startswith("torch.func") for n in names)
    assert seen and all(seen)  # every linear call of every method ran inside the autocast region
    with pytest.raises(ValueError, match="precision"):
        cases.Case("micro", "full", 8, 2, 1, "cpu", [], precision="fp16")


def test_memory_and_scope_goals_read_the_rows():
    """peak_memory checks the one-pass subset rows' peak-memory ratio; global_vs_layerwise their time ratio."""
    from drpost.bench.system.report import evaluate_goals

    def row(method, ratio, peak):
        return {"kind": "dr", "one_pass": True, "kw": {"method": method}, "ratio": ratio, "ratio_q25": ratio - 0.01,
                "ratio_q75": ratio + 0.01, "held_back_by": "assembly", "peak_mem_ratio": peak, "step_mem_ratio": 1.3}

    case = {"config": {"size": "smollm2", "mode": "full", "T": 64, "n": 8, "m": 1},
            "methods": {"global/one_pass/auto": row("global_subset", 1.10, 1.12),
                        "layerwise/one_pass/auto": row("layerwise_subset", 1.00, 1.20)}}
    goals = {(g["goal"], g["method"]): g for g in evaluate_goals([case])}
    assert goals[("peak_memory", "global/one_pass/auto")]["met"]
    assert not goals[("peak_memory", "layerwise/one_pass/auto")]["met"]
    vs = goals[("global_vs_layerwise", "global/one_pass/auto / layerwise/one_pass/auto")]
    assert abs(vs["value"] - 1.10) < 1e-12 and not vs["met"]


def test_a_stopped_run_is_resumed_and_a_finished_or_other_one_is_not(tmp_path, monkeypatch):
    from drpost.bench.system import measure

    quiet = dict(micro=True, repeats=1, log=lambda *a: None, seq_lengths=[8, 12], scorings=["auto"])
    first = system.run_system_bench(tmp_path, **quiet)
    assert first["carried_cases"] == 0
    stopped = json.loads((tmp_path / "system.json").read_text())
    stopped.update(partial=True, crossovers=None, cases=stopped["cases"][:1])  # stopped after the first config
    (tmp_path / "system.json").write_text(json.dumps(stopped))
    measured = []
    orig = measure.measure_case

    def spy(cfg, *a, **kw):
        measured.append(cfg["T"])
        return orig(cfg, *a, **kw)

    monkeypatch.setattr(measure, "measure_case", spy)
    res = system.run_system_bench(tmp_path, **quiet)
    assert measured == [12] and res["carried_cases"] == 1 and res["cases"][0] == stopped["cases"][0]
    assert "**Resumed**: 1 of the 2" in (tmp_path / "summary.md").read_text()
    # stopped after the second config only: a crash while measuring the first again keeps the second on disk
    later = dict(stopped, cases=first["cases"][1:])
    (tmp_path / "system.json").write_text(json.dumps(later))
    monkeypatch.setattr(measure, "crossovers", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        system.run_system_bench(tmp_path, **quiet)
    kept = json.loads((tmp_path / "system.json").read_text())
    assert kept["partial"] and [c["config"]["T"] for c in kept["cases"]] == [8, 12]
    assert kept["cases"][1] == json.loads(json.dumps(first["cases"][1]))
    monkeypatch.undo()
    monkeypatch.setattr(measure, "measure_case", spy)
    # a finished run is measured again, as is a stopped one with other settings, or with resume off
    for change, expect in ((dict(), [8, 12]), (dict(repeats=2), [8, 12]), (dict(resume=False), [8, 12])):
        (tmp_path / "system.json").write_text(json.dumps(stopped if change else res))
        measured.clear()
        system.run_system_bench(tmp_path, **{**quiet, **change})
        assert measured == expect, change
