"""Smoke test of the system benchmark machinery (drpost.bench.system): one micro configuration, one repeat.

Checks that the files and JSON keys exist; never asserts a time.
"""

import json

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
    assert {"m_sweep", "T_sweep"} <= set(data["crossovers"])
    assert {"analytic_m_star", "measured_m_star"} <= set(data["crossovers"]["m_sweep"])
    assert "Command:" in (tmp_path / "summary.md").read_text()
    assert res["cases"][0]["config"]["size"] == "micro"


def test_run_accepts_a_config_object_or_dict(tmp_path):
    class Cfg:
        output_dir = str(tmp_path / "a")
        micro = True
        repeats = 1

    assert system.run(Cfg()) == 0
    assert (tmp_path / "a" / "system.json").is_file()
    assert system.run({"out_dir": str(tmp_path / "b"), "micro": True, "repeats": 1}) == 0
    assert (tmp_path / "b" / "summary.md").is_file()
