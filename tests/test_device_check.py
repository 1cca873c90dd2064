"""scripts/device_check.py, the prepared GPU check, run here on the CPU: ``--device cpu --quick`` writes every part
with finite numbers, the engine is exact on CPU float64, the output stays within the device tool's limits (few
flat files), and the time budget skips what it cannot start."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _numbers(x, path=""):
    """Every number in the JSON, with where it is; 'inf' strings count as numbers (non-finite)."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, float(x)
    elif x in ("inf", "-inf"):
        yield path, math.inf


def test_constants_are_the_mixed_precision_tests():
    from tests.geometry import test_mixed_precision as tmp

    dc = _module()
    assert dc.MP_SCALE == tmp.SCALE
    assert dc.MP_METHODS == tmp.METHODS
    marks = {m.args[0]: m.args[1] for m in tmp.test_mixed_precision_step_matches_float32.pytestmark}
    assert set(marks["mode"]) <= set(dc.MP_MODES) and set(marks["family"]) == set(dc.MP_FAMILIES)


@pytest.mark.slow
def test_quick_cpu_run_writes_every_part(tmp_path):
    from tests.geometry import zoo

    out = tmp_path / "dc"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = [p for p in out.rglob("*")]
    assert all(p.is_file() for p in files), files  # flat: no sub-folders
    assert 3 <= len(files) <= 8 and all(p.stat().st_size < 16 * 2**20 for p in files)
    assert {p.name for p in files} == {"device_check.json", "device_check.md", "device_check.log",
                                       "system_bf16.md", "system_fp32.md"}
    res = json.loads((out / "device_check.json").read_text())
    assert res["skipped"] == [] and res["errors"] == [], (res["skipped"], res["errors"])
    assert set(res["parts"]) == {"exact", "mixed", "system"}
    bad = [(p, v) for p, v in _numbers(res) if not math.isfinite(v)]
    assert not bad, bad[:5]
    assert res["meta"]["ok"], {k: v.get("ok") for k, v in res["parts"].items()}

    ex = res["parts"]["exact"]
    assert ex["dtype"] == "float64" and ex["threshold"] == zoo.EXACT
    exact = [r for r in ex["rows"] if r["status"] == "exact"]
    assert {r["arch"] for r in exact} == {"llama", "gpt2", "mixtral"}
    assert {r["variant"] for r in exact} == {v[0] for v in zoo.VARIANTS}
    assert all(r["status"] in ("exact", "refused") for r in ex["rows"]), ex["rows"]
    assert all(r["max_err"] <= zoo.EXACT for r in exact)
    assert all(r["listed"] for r in ex["rows"] if r["status"] == "refused")  # mixtral LoRA: PEFT wraps the experts

    mx = res["parts"]["mixed"]
    assert len(mx["rows"]) == 2 * 5 * 4 and all(r["ok"] for r in mx["rows"])
    assert all(r["grad_rel"] <= r["tol_grad"] for r in mx["rows"])
    assert all(r["scores_rel"] <= mx["tolerance"]["scores"] for r in mx["rows"] if r["method"] != "full_training")
    assert not any(r["found_inf"] for r in mx["rows"] if r["mode"] == "fp16_gradscaler")

    sy = res["parts"]["system"]
    assert set(sy["runs"]) == {"bf16", "fp32"}
    for prec, r in sy["runs"].items():
        assert r["rc"] == 0 and not r["timed_out"] and not r["partial"] and r["settings"]["precision"] == prec
        assert r["cases"] and r["goals"]
        for c in r["cases"]:
            assert c["methods"]["standard"]["ratio"] == 1.0
            assert all(m["ratio"] > 0 and m["peak_mem_bytes"] > 0 for m in c["methods"].values())
    both = [row for row in sy["table"] if "ratio_bf16" in row and "ratio_fp32" in row]
    assert any(row["method"] == "global/one_pass/auto" for row in both)


def test_budget_skips_what_it_cannot_start(tmp_path):
    dc = _module()
    assert dc.main(["--device", "cpu", "--quick", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "device_check.json").read_text())
    assert [s["part"] for s in res["skipped"]] == ["exact", "mixed", "system"]
    assert all("budget" in s["reason"] for s in res["skipped"])
    assert res["parts"] == {} and res["meta"]["ok"] is False
    assert "## Skipped" in (tmp_path / "device_check.md").read_text()
