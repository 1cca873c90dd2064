"""Training checkpoints: atomic writes, verified reads, and the resume lookup (``resume: auto | PATH``).

A checkpoint is a directory ``<output_dir>/checkpoints/step-<NNNNNNNN>/`` holding
- ``weights.safetensors``: the trainable parameters by name (all weights for full fine-tuning, adapters for LoRA;
  other trained modules by prefix, e.g. ``value_head.`` for RLHF);
- ``trainer_state.pt``: optimizer and LR-scheduler state dicts, torch / python RNG states, the DataRegularizer's
  running state (automatic-strength estimates, autotune choices) and the task's own state (``task``: sampler RNGs and
  the guided sampler's predictor (``drpost.trainers.samplers``),
  generators, caches; see ``drpost.trainers.loop.Task``); plain tensors and containers only, read back with
  ``torch.load(weights_only=True)`` (never arbitrary pickles);
- ``progress.json``: the step reached, the metrics so far and the run's config;
- ``manifest.json`` (written last): format version, step, and every file's size and sha256.

Writing is atomic: everything goes to a hidden temporary directory beside the final one, every file and the
directory are fsync'ed, then the directory is renamed into place (and the parent fsync'ed). A process killed while
saving leaves only a ``.tmp-*`` directory, which ``latest_checkpoint`` ignores and ``clean_stale`` removes.
Reading checks the manifest first: a missing file, a size mismatch (truncation) or a sha256 mismatch (corruption)
raises ``CheckpointError`` naming the file, before anything is deserialized. ``prune(root, keep)`` deletes all but
the newest ``keep`` checkpoints (``save_total_limit``).

    save_checkpoint(out_dir / "checkpoints", step, weights, trainer_state, progress)
    ckpt = load_checkpoint(resolve_resume("auto", out_dir))   # -> Checkpoint(step, weights, trainer_state, progress)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from drpost.config import ConfigError

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
WEIGHTS, STATE, PROGRESS, MANIFEST = "weights.safetensors", "trainer_state.pt", "progress.json", "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ConfigError):
    """A checkpoint named by ``resume`` is missing, incomplete, corrupt or does not fit the run (CLI exit 2)."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    weights: dict  # name -> Tensor (trainable parameters)
    trainer_state: dict  # optimizer, scheduler, rng, regularizer
    progress: dict  # step, metrics so far


# ----------------------------------------------------------------------------------------------------------- write
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(root: str | Path, step: int, weights: dict, trainer_state: dict, progress: dict) -> Path:
    """Write one checkpoint atomically under ``root`` (``.../checkpoints``); returns its final directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
    torch.save(trainer_state, tmp / STATE)
    (tmp / PROGRESS).write_text(json.dumps(progress), encoding="utf-8")
    files = {}
    for name in (WEIGHTS, STATE, PROGRESS):
        _fsync_file(tmp / name)
        files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT_VERSION, "step": step, "files": files}, indent=1),
                                encoding="utf-8")
    _fsync_file(tmp / MANIFEST)
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rename(final)
    _fsync_dir(root)
    return final


def prune(root: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints under ``root`` (none = keep all); returns what was removed."""
    root = Path(root)
    if keep is None or not root.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name)))
    old = [p for _, p in found[:max(0, len(found) - keep)]]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


def clean_stale(root: str | Path) -> list[Path]:
    """Remove temporary directories left by a process killed while saving; returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.startswith((".tmp-", ".old-"))]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


# ------------------------------------------------------------------------------------------------------------ read
def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step under ``output_dir/checkpoints`` (temporary dirs ignored), or None."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return max(found)[1] if found else None


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``resume`` option -> checkpoint directory: None = fresh start; 'auto' = latest in output_dir (None if none)."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"option 'resume': checkpoint directory {resume} does not exist")
    return path


def verify_checkpoint(path: str | Path) -> dict:
    """Check the manifest against the files (presence, size, sha256); returns the manifest or raises."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it is incomplete (interrupted while saving?) "
                              f"or not a drpost checkpoint; refusing to resume from it")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
        files = manifest["files"]
        step = int(manifest["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {MANIFEST} ({e}); refusing to resume from it") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format {manifest.get('format')!r} is not supported "
                              f"(expected {FORMAT_VERSION})")
    for name in (WEIGHTS, STATE, PROGRESS):
        if name not in files:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} does not list {name}")
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing; refusing to resume from it")
        size, want = f.stat().st_size, int(files[name]["bytes"])
        if size != want:
            raise CheckpointError(f"checkpoint {path}: {name} is {size} bytes, the manifest says {want} "
                                  f"(truncated or partially written); refusing to resume from it")
        if _sha256(f) != files[name]["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its sha256 in {MANIFEST} (corrupt); "
                                  f"refusing to resume from it")
    manifest["step"] = step
    return manifest


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Verify, then read a checkpoint (safetensors and ``torch.load(weights_only=True)`` only)."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    try:
        weights = load_file(str(path / WEIGHTS), device=str(map_location))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad headers
        raise CheckpointError(f"checkpoint {path}: {WEIGHTS} is not a valid safetensors file ({e})") from None
    try:
        state = torch.load(path / STATE, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError for anything beyond tensors and plain containers
        raise CheckpointError(f"checkpoint {path}: {STATE} cannot be loaded with weights_only=True ({e}); "
                              f"refusing it") from None
    try:
        progress = json.loads((path / PROGRESS).read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {PROGRESS} is not valid JSON ({e})") from None
    return Checkpoint(path, manifest["step"], weights, state, progress)


# ------------------------------------------------------------------------------------------ state of a training run
def trainable_weights(model: torch.nn.Module) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_weights(model: torch.nn.Module, weights: dict, where: Path) -> None:
    """Copy checkpointed trainable weights into ``model``; the names and shapes must match exactly."""
    load_params(trainable_weights(model), weights, where)


def load_params(params: dict, weights: dict, where: Path) -> None:
    """Copy checkpointed weights into ``params`` (name -> Parameter); the names and shapes must match exactly."""
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {where} does not fit this model's trainable weights (model.finetuning / "
                              f"model.name_or_path changed?): missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != weights[n].shape:
                raise CheckpointError(f"checkpoint {where}: weight {n} has shape {tuple(weights[n].shape)}, the "
                                      f"model has {tuple(p.shape)}")
            p.copy_(weights[n])


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    """random.setstate needs tuples; keep it robust to lists from other serializers."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def regularizer_state(reg) -> dict:
    """The DataRegularizer's running state: automatic-strength estimates and cached scoring choices."""
    return reg.state_dict()


def load_regularizer_state(reg, state: dict) -> None:
    reg.load_state_dict(state)
