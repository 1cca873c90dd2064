"""Checkpoints and resume: kill -9 mid-run then ``resume=auto`` gives the uninterrupted run's metrics and weights
bit for bit (CPU, one thread) for every paradigm (sft, dpo, rlvr, rlhf); corrupt / truncated / incomplete /
malicious checkpoints are refused by name."""

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

from drpost import cli
from drpost.trainers import checkpoint as ckpt
from tests.reliability.conftest import SMALL, read_metrics, run_sft

SAME = ("train_loss", "target_loss", "evals", "skipped_steps", "skip_reasons", "solver_fallbacks", "family_weight",
        "steps")
VOLATILE = ("train_seconds", "resumed_from", "config")  # wall time; where a resumed run came from; its output_dir


def _final_weights(out: Path) -> dict:
    name = "adapter_model.safetensors" if (out / "final" / "adapter_model.safetensors").exists() else "model.safetensors"
    w = load_file(str(out / "final" / name))
    if (out / "final" / "value_head.safetensors").exists():  # RLHF
        w.update({f"value_head.{k}": v for k, v in load_file(str(out / "final" / "value_head.safetensors")).items()})
    return w


def _assert_same_run(a: Path, b: Path) -> None:
    ma, mb = read_metrics(a), read_metrics(b)
    for k in SAME:
        assert ma.get(k) == mb.get(k), k
    assert {k: v for k, v in ma.items() if k not in VOLATILE} == {k: v for k, v in mb.items() if k not in VOLATILE}
    wa, wb = _final_weights(a), _final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="session")
def classifier_dir(micro_dir, tmp_path_factory) -> Path:
    """A one-logit sequence classifier on the micro model (an untrained reward model for drpost rlhf)."""
    from transformers import AutoTokenizer

    from drpost.trainers.reward_model import load_classifier

    path = tmp_path_factory.mktemp("micro-rm")
    load_classifier(micro_dir).save_pretrained(path)
    AutoTokenizer.from_pretrained(micro_dir).save_pretrained(path)
    return path


KILL_RUN = ["steps=16", "save_every=2", "regularizer.method=hull", "regularizer.slack=auto"]
RL = ["device=cpu", "eval_every=0", "optim.lr=1e-3", "data.max_general_samples=64", "save_every=2"]
KILL_RUNS = {  # tiny runs of every paradigm, killed right after their first checkpoint (step 2)
    "sft": [*SMALL, *KILL_RUN],
    "dpo": [*RL, "steps=10", "general_batch_size=2", "target_batch_size=1", "regularizer.method=hull",
            "regularizer.slack=auto", "data.max_seq_length=64"],
    "rlvr": [*RL, "steps=8", "grpo.group_size=2", "grpo.prompts_per_step=2", "grpo.max_new_tokens=3",
             "target_batch_size=1", "regularizer.method=layerwise_subset", "grpo.kl_coef=0.01"],
    "rlhf": [*RL, "steps=8", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=2", "ppo.ppo_epochs=1",
             "ppo.max_new_tokens=3", "ppo.target_rollouts=2", "target_batch_size=2", "ppo.adaptive_kl=true",
             "regularizer.method=layerwise_subset", "model.finetuning=lora", "model.lora_target_modules=q_proj,v_proj"],
}


def _run(command: str, argv: list[str], capsys) -> int:
    try:
        return cli.main([command, *argv])
    except SystemExit as e:
        return e.code
    finally:
        capsys.readouterr()


@pytest.mark.parametrize("command", list(KILL_RUNS))
def test_kill_dash_nine_then_resume_auto_equals_uninterrupted(command, tmp_path, micro_dir, classifier_dir, capsys,
                                                               one_thread):
    """A subprocess ``drpost <command>`` is killed with SIGKILL right after its first checkpoint; ``resume=auto``
    (run in-process, one thread like the subprocess) must end exactly where an uninterrupted run ends: the same
    metrics.json (wall time aside) and the same final weights, bit for bit."""
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    argv = [f"model.name_or_path={micro_dir}", *KILL_RUNS[command]]
    if command == "rlhf":
        argv.append(f"reward_model={classifier_dir}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "drpost.cli", command, f"output_dir={killed}", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed / "checkpoints" / ckpt.step_dir_name(2)
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert first.exists() and not (killed / "final").exists() and not (killed / "metrics.json").exists()

    assert _run(command, [f"output_dir={ref}", *argv], capsys) == 0
    assert _run(command, [f"output_dir={killed}", *argv, "resume=auto"], capsys) == 0
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
