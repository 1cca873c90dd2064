"""The CLI run around the shared loop: ``run_task(config, build, sources)`` runs ``drpost sft|dpo|rlhf|rlvr``.

``build(config, device, sources) -> (task, eval_fn)`` (each paradigm's module) loads and checks everything -- model,
data, options -- before anything but ``output_dir/train.log`` is written; ``sources``
(``drpost.trainers.sources.Sources``, None = files only) is where the model and data come from. ``run_task`` then
1. resumes (``resume: auto | PATH``): the trainable weights, optimizer, scheduler, regularizer, RNGs and the task's
   own state come back from the checkpoint, so a resumed run ends bit for bit where an uninterrupted one ends;
   ``resume=auto`` after a finished run prints that it is finished and trains nothing;
2. writes ``config.yaml`` and trains through ``drpost.trainers.loop.train``, logging a line every
   ``log.log_every`` steps to ``train.log`` (and a tqdm bar on a terminal), TensorBoard / W&B when asked, and a
   checkpoint every ``save_every`` steps and at the last step, keeping the newest ``save_total_limit``;
3. evaluates, saves the trained model into ``output_dir/final/`` (``save_pretrained``: safetensors weights, or the
   LoRA adapters as PEFT saves them, plus the tokenizer) and writes ``metrics.json``.
Ctrl-C ends with "interrupted at step N; resume with: ...", a partial ``metrics.json`` and exit code 130.

``reconcile_resume(cls, argv, config)`` (called by the CLI) makes a resumed run reuse its saved ``config.yaml``:
options given again on the command line must agree with it, except ``RESUME_MUTABLE`` and a larger ``steps``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from drpost.config import ConfigError, command_of, leaf_options, parse_config, save_resolved, to_dict
from drpost.trainers import checkpoint as ckpt
from drpost.trainers.loop import Task, TrainState, run_eval, train

log = logging.getLogger("drpost")
INTERRUPTED = 130
# options a resumed run may change: where it runs and how it reports, not what it trains
RESUME_MUTABLE = ("resume", "output_dir", "device", "save_every", "save_total_limit", "log.log_every",
                  "log.tensorboard", "log.wandb", "log.wandb_project", "log.wandb_run_name")


# ------------------------------------------------------------------------------------------------ resume and config
def _get(config, dotted: str):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def reconcile_resume(cls: type, argv: list[str], config):
    """The config of a resumed run: the saved ``output_dir/config.yaml`` with ``argv`` applied on top; options that
    ``argv`` changes are refused (ConfigError naming each, with both values) unless in ``RESUME_MUTABLE`` or a
    larger ``steps``. Unchanged when ``config.resume`` is none or the run directory has no config.yaml."""
    saved = Path(config.output_dir) / "config.yaml"
    if getattr(config, "resume", None) is None or not saved.is_file():
        return config
    base = parse_config(cls, ["--config", str(saved)])
    merged = parse_config(cls, ["--config", str(saved), *argv])
    changed = []
    for name, _f, _tp in leaf_options(cls):
        old, new = _get(base, name), _get(merged, name)
        if old == new or name in RESUME_MUTABLE:
            continue
        if name == "steps" and new > old:
            continue
        changed.append(f"'{name}' (saved {old!r}, given {new!r})")
    if changed:
        raise ConfigError(f"option{'s' if len(changed) > 1 else ''} {'; '.join(changed)}: a resumed run keeps the "
                          f"config saved in {saved}; drop {'them' if len(changed) > 1 else 'it'} from the command "
                          f"line (only steps may grow), or start a new run in another output_dir")
    merged.output_dir = config.output_dir
    return merged


def _finished_steps(out: Path) -> int | None:
    """Steps of the finished run in ``out`` (metrics.json says finished and final/ exists), else None."""
    try:
        m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or not m.get("finished") or not (out / "final").is_dir():
        return None
    return int(m.get("completed_steps", 0))


def restore(task: Task, state: TrainState, c: ckpt.Checkpoint) -> None:
    """Put a checkpoint back into a freshly built task: weights first (a mismatch names the weights)."""
    ckpt.load_params(trainable_params(task), c.weights, c.path)
    ts = c.trainer_state
    try:
        task.opt.load_state_dict(ts["optimizer"])
        task.sched.load_state_dict(ts["scheduler"])
        ckpt.load_regularizer_state(task.reg, ts["regularizer"])
        task.load_state_dict(ts["task"])
        ckpt.set_rng_state(ts["rng"])
        state.step = int(c.progress["step"])
        state.metrics = c.progress["metrics"]
    except (KeyError, ValueError, TypeError) as e:
        raise ckpt.CheckpointError(f"checkpoint {c.path} does not fit this run (optimizer or options changed?): "
                                   f"{e}") from None


def trainable_params(task: Task) -> dict:
    return {prefix + n: p for prefix, m in task.modules().items() for n, p in ckpt.trainable_weights(m).items()}


def save(out: Path, task: Task, state: TrainState, config) -> Path:
    trainer_state = {"optimizer": task.opt.state_dict(), "scheduler": task.sched.state_dict(),
                     "rng": ckpt.rng_state(), "regularizer": ckpt.regularizer_state(task.reg),
                     "task": task.state_dict()}
    progress = {"step": state.step, "metrics": state.metrics, "config": to_dict(config)}
    return ckpt.save_checkpoint(out / ckpt.CHECKPOINT_DIR, state.step, trainable_params(task), trainer_state,
                                progress)


def save_final(task: Task, out: Path) -> Path:
    """``final/``: the model (safetensors; LoRA adapters only, as PEFT saves them), tokenizer, extra modules."""
    from transformers.utils import logging as hf_logging

    final = out / "final"
    if final.exists():  # an extended run replaces the earlier final model
        shutil.rmtree(final)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar between the log lines
    try:
        task.model.save_pretrained(final, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if task.tokenizer is not None:
        task.tokenizer.save_pretrained(final)
    task.save_extra(final)
    return final


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------- trackers
class Trackers:
    """TensorBoard (``log.tensorboard``) and Weights & Biases (``log.wandb``) scalars; a missing package is a
    warning naming the option and the run goes on (metrics.json is always written)."""

    def __init__(self, config, out: Path):
        self.tb = self.wandb = None
        lc = config.log
        if lc.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:
                log.warning("log.tensorboard=true but the 'tensorboard' package is not installed (pip install "
                            "tensorboard); continuing without TensorBoard, metrics.json is still written")
        if lc.wandb:
            try:
                import wandb
            except ImportError:
                log.warning("log.wandb=true but the 'wandb' package is not installed (pip install wandb); "
                            "continuing without W&B, metrics.json is still written")
            else:
                self.wandb = wandb.init(project=lc.wandb_project, name=lc.wandb_run_name or out.name,
                                        dir=str(out), config=to_dict(config))

    def scalars(self, values: dict, step: int, prefix: str) -> None:
        values = {f"{prefix}/{k}": float(v) for k, v in values.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# -------------------------------------------------------------------------------------------------------- the run
def run_task(config, build, sources=None) -> int:
    """Build, (resume,) train, checkpoint, evaluate and save one CLI run; returns the exit code (130 on Ctrl-C)."""
    from drpost.data.formats import DataError
    from drpost.trainers.setup import run_log

    command = command_of(config) or "train"
    with run_log(config.output_dir):
        try:
            return _run(config, build, sources, command)
        except KeyboardInterrupt:  # before the first step: nothing to resume
            msg = f"interrupted before training started; nothing was trained (drpost {command})"
            log.error("%s", msg)
            print(f"drpost {command}: {msg}", file=sys.stderr)
            return INTERRUPTED
        except (ConfigError, DataError) as e:
            log.error("%s", e)
            raise
        except Exception:
            log.exception("drpost %s failed", command)
            raise


def _run(config, build, sources, command: str) -> int:
    from drpost.trainers import setup

    out = Path(config.output_dir)
    done = _finished_steps(out) if config.resume == "auto" else None
    if done is not None and done >= config.steps:
        msg = (f"the run in {out} is finished ({done} steps); nothing to train (give steps=N with N > {done} to "
               f"extend it)")
        log.info("%s", msg)
        return 0
    torch.manual_seed(config.seed)
    device = setup.resolve_device(config.device)
    # 1. everything that can be wrong is checked here, before anything but the log is written
    task, eval_fn = build(config, device, sources)
    resume_from = ckpt.resolve_resume(config.resume, out)
    if done is not None and resume_from is None:
        raise ConfigError(f"option 'steps': the run in {out} finished at step {done} without a checkpoint to "
                          f"continue from (it ran with save_every=0); start a new run in another output_dir")
    c = ckpt.load_checkpoint(resume_from, map_location=device) if resume_from is not None else None
    state = TrainState(0, task.new_metrics())
    if c is not None:
        restore(task, state, c)
        log.info("resumed from %s at step %d", c.path, state.step)
        state.metrics["resumed_from"] = str(c.path)
    elif config.resume == "auto":
        log.info("resume=auto: no checkpoint in %s, starting fresh", out / ckpt.CHECKPOINT_DIR)

    # 2. the run directory
    save_resolved(config, out)
    removed = ckpt.clean_stale(out / ckpt.CHECKPOINT_DIR)
    if removed:
        log.info("removed %d incomplete checkpoint directories left by an interrupted save", len(removed))
    trackers = Trackers(config, out)
    log.info("drpost %s: method %s, %d %ss from %d, device %s", command, config.regularizer.method, config.steps,
             task.unit, state.step, device)
    try:
        train(task, state, config.steps, eval_fn=eval_fn, eval_every=config.eval_every, progress=command,
              hooks=[_log_hook(task, config, trackers), _save_hook(task, config, out)])
        # 3. final evaluation, model, metrics
        run_eval(task, eval_fn, state, config.steps)
        if state.metrics["evals"] and state.metrics["evals"][-1].get(task.unit) == config.steps:
            trackers.scalars(state.metrics["evals"][-1], config.steps, "eval")
        task.finish(state.metrics)
        final = save_final(task, out)
    except KeyboardInterrupt:  # during a step, the final evaluation or the final save
        return _interrupted(command, config, out, state)
    finally:
        trackers.close()
    metrics = state.metrics
    metrics.setdefault("steps", state.step)
    metrics.update(completed_steps=state.step, finished=True, config=to_dict(config))
    write_json(out / "metrics.json", metrics)
    log.info("done: %d %ss (%d skipped, %d solver fallbacks); final model in %s", state.step, task.unit,
             metrics["skipped_steps"], metrics.get("solver_fallbacks", 0), final)
    return 0


def _log_hook(task: Task, config, trackers: Trackers):
    every, total = config.log.log_every, config.steps

    def hook(state, logs: dict) -> None:
        if logs.get("skipped"):
            log.warning("%s %d skipped: %s (parameters and optimizer state untouched)", task.unit, state.step,
                        logs["skipped"])
        scalars = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if state.step % every == 0 or state.step == total:
            body = " ".join(f"{k} {v:.4g}" for k, v in scalars.items() if k not in ("s_per_step", "lr"))
            log.info("%s %d/%d %s lr %.3g s/%s %.3g", task.unit, state.step, total, body,
                     scalars.get("lr", float("nan")), task.unit, scalars.get("s_per_step", float("nan")))
        trackers.scalars(scalars, state.step, "train")
        evals = state.metrics["evals"]
        if evals and evals[-1].get(task.unit) == state.step:
            trackers.scalars(evals[-1], state.step, "eval")
            log.info("eval at %s %d: %s", task.unit, state.step,
                     {k: v for k, v in evals[-1].items() if isinstance(v, (int, float))})

    return hook


def _save_hook(task: Task, config, out: Path):
    def hook(state, logs: dict) -> None:
        if config.save_every and (state.step % config.save_every == 0 or state.step == config.steps):
            path = save(out, task, state, config)
            log.info("checkpoint %s", path)
            removed = ckpt.prune(out / ckpt.CHECKPOINT_DIR, config.save_total_limit)
            if removed:
                log.info("removed old checkpoints (save_total_limit=%d): %s", config.save_total_limit,
                         ", ".join(p.name for p in removed))

    return hook


def _interrupted(command: str, config, out: Path, state: TrainState) -> int:
    latest = ckpt.latest_checkpoint(out)
    where = f"continues from checkpoint {latest.name}" if latest is not None else \
        "no checkpoint yet, so it starts over; set save_every to checkpoint"
    msg = f"interrupted at step {state.step}; resume with: drpost {command} output_dir={config.output_dir} " \
          f"resume=auto ({where})"
    metrics = {**state.metrics, "completed_steps": state.step, "finished": False, "interrupted": True,
               "config": to_dict(config)}
    write_json(out / "metrics.json", metrics)
    log.warning("%s", msg)
    print(f"drpost {command}: {msg}", file=sys.stderr)
    return INTERRUPTED
