"""Checkpoints and resume: kill -9 mid-run then ``resume=auto`` gives the uninterrupted run's metrics and weights
bit for bit (CPU, one thread); corrupt / truncated / incomplete / malicious checkpoints are refused by name."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drpost.trainers import checkpoint as ckpt
from tests.reliability.conftest import SMALL, read_metrics, run_sft

SAME = ("train_loss", "target_loss", "evals", "skipped_steps", "skip_reasons", "solver_fallbacks", "family_weight",
        "steps")


def _assert_same_run(a: Path, b: Path) -> None:
    ma, mb = read_metrics(a), read_metrics(b)
    for k in SAME:
        assert ma[k] == mb[k], k
    name = "adapter_model.safetensors" if (a / "final" / "adapter_model.safetensors").exists() else "model.safetensors"
    wa, wb = load_file(str(a / "final" / name)), load_file(str(b / "final" / name))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


KILL_RUN = ["steps=16", "save_every=2", "regularizer.method=hull", "regularizer.slack=auto"]


def test_kill_dash_nine_then_resume_auto_equals_uninterrupted(tmp_path, micro_dir, capsys, one_thread):
    """A subprocess ``drpost sft`` is killed with SIGKILL right after its first checkpoint; ``resume=auto`` (run
    in-process, one thread like the subprocess) must end exactly where an uninterrupted run ends."""
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    argv = [f"model.name_or_path={micro_dir}", *SMALL, *KILL_RUN]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "drpost.cli", "sft", f"output_dir={killed}", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed / "checkpoints" / ckpt.step_dir_name(2)
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert first.exists() and not (killed / "final").exists() and not (killed / "metrics.json").exists()

    assert run_sft([f"output_dir={ref}", *argv], capsys)[0] == 0
    assert run_sft([f"output_dir={killed}", *argv, "resume=auto"], capsys)[0] == 0
    m = read_metrics(killed)
    assert m["resumed_from"].startswith(str(killed / "checkpoints" / "step-"))
    assert "resumed from" in (killed / "train.log").read_text()
    _assert_same_run(ref, killed)


def test_resume_in_process_with_auto_radius_state(tmp_path, micro_dir, capsys, one_thread):
    """Ball(radius=auto) keeps a running noise estimate: it is checkpointed, so resuming mid-run is exact."""
    argv = [f"model.name_or_path={micro_dir}", *SMALL, "save_every=3", "regularizer.method=ball",
            "regularizer.radius=auto", "model.finetuning=lora", "model.lora_target_modules=q_proj,v_proj"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_sft([f"output_dir={a}", *argv], capsys)[0] == 0
    state = torch.load(a / "checkpoints" / ckpt.step_dir_name(3) / ckpt.STATE, weights_only=True)
    assert state["regularizer"]["feasible_auto"]["steps"] == 3  # the estimate really is part of the state
    shutil.copytree(a / "checkpoints" / ckpt.step_dir_name(3), b / "checkpoints" / ckpt.step_dir_name(3))
    assert run_sft([f"output_dir={b}", *argv, "resume=auto"], capsys)[0] == 0
    _assert_same_run(a, b)
    assert (a / "final" / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------------------------------- corrupt checkpoints
@pytest.fixture
def saved(tmp_path) -> Path:
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    state = {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}, "rng": ckpt.rng_state(),
             "sampler_rng": __import__("random").Random(0).getstate()}
    return ckpt.save_checkpoint(tmp_path / "checkpoints", 7, weights, state, {"step": 7, "metrics": {}})


def _rewrite_manifest(path: Path, name: str) -> None:
    """Make the manifest agree with a tampered file, so that only the deserializer can catch it."""
    mf = json.loads((path / ckpt.MANIFEST).read_text())
    data = (path / name).read_bytes()
    mf["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / ckpt.MANIFEST).write_text(json.dumps(mf))


def test_round_trip_and_latest_ignores_temp_dirs(saved, tmp_path):
    c = ckpt.load_checkpoint(saved)
    assert c.step == 7 and torch.equal(c.weights["w"], torch.arange(6.0).reshape(2, 3))
    (saved.parent / ".tmp-step-00000009-123").mkdir()  # a save interrupted by kill -9
    assert ckpt.latest_checkpoint(tmp_path) == saved
    assert ckpt.clean_stale(saved.parent) and ckpt.latest_checkpoint(tmp_path) == saved
    assert ckpt.resolve_resume("auto", tmp_path / "elsewhere") is None


@pytest.mark.parametrize("damage,fragment", [
    ("truncate", "truncated"),
    ("flip", "sha256"),
    ("missing", "trainer_state.pt is missing"),
    ("no_manifest", "incomplete"),
    ("bad_header", "not a valid safetensors"),
])
def test_damaged_checkpoint_is_refused(saved, damage, fragment):
    w = saved / ckpt.WEIGHTS
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:-5])
    elif damage == "flip":
        data = bytearray(w.read_bytes())
        data[-1] ^= 0xFF
        w.write_bytes(bytes(data))
    elif damage == "missing":
        (saved / ckpt.STATE).unlink()
    elif damage == "no_manifest":
        (saved / ckpt.MANIFEST).unlink()
    else:
        w.write_bytes(b"\xff" * 8 + b"{not json" + w.read_bytes()[17:])
        _rewrite_manifest(saved, ckpt.WEIGHTS)
    with pytest.raises(ckpt.CheckpointError, match=fragment):
        ckpt.load_checkpoint(saved)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_pickle_payload_in_trainer_state_is_refused(saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"optimizer": _Payload()}, saved / ckpt.STATE)
    _rewrite_manifest(saved, ckpt.STATE)
    with pytest.raises(ckpt.CheckpointError, match="weights_only"):
        ckpt.load_checkpoint(saved)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_cli_refuses_corrupt_resume_path(saved, tmp_path, micro_dir, capsys):
    (saved / ckpt.WEIGHTS).write_bytes(b"")
    out = tmp_path / "run"
    code, err = run_sft([f"output_dir={out}", f"model.name_or_path={micro_dir}", *SMALL, f"resume={saved}"], capsys)
    assert code == 2 and "truncated" in err and str(saved) in err
    assert sorted(p.name for p in out.iterdir()) == ["train.log"]


def test_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path, micro_dir, capsys):
    weights = {"not.a.weight": torch.zeros(2)}
    state = {"optimizer": {}, "scheduler": {}, "rng": ckpt.rng_state(), "sampler_rng": (3, (0,) * 625, None),
             "regularizer": {}}
    path = ckpt.save_checkpoint(tmp_path / "run" / "checkpoints", 2, weights, state, {"step": 2, "metrics": {}})
    code, err = run_sft([f"output_dir={tmp_path / 'run'}", f"model.name_or_path={micro_dir}", *SMALL,
                         "resume=auto"], capsys)
    assert code == 2 and "does not fit this model" in err and str(path) in err
