"""The training loop every paradigm shares (SFT, DPO, RLHF, RLVR): a ``Task`` supplies its steps, ``train`` runs them.

A paradigm is a ``Task``: the model it trains (``model``; ``modules()`` adds other trained modules such as the RLHF
value head), its optimizer, LR scheduler and ``DataRegularizer``, and ``step(i, metrics)``, which draws the batches
of step ``i``, makes the update(s), advances the scheduler and returns the step's scalars for logging. A task keeps
its own running state (samplers, generators, caches) and exposes it through ``state_dict`` / ``load_state_dict`` so
that a checkpoint (``drpost.trainers.runner``) can restore a run bit for bit. Data, rewards and evaluation are given
to a task as arguments; the task never loads them itself.

``train(task, state, end, ...)`` runs steps ``state.step .. end-1`` with periodic evaluation and per-step hooks
(logging, checkpoints) and an optional progress bar (tqdm on a terminal). The library entry points
(``train_sft``, ``train_dpo``, ``train_rlhf``, ``train_rlvr``) and the CLI (``drpost.trainers.runner.run_task``) both
drive their task through it.

Schedules (every trainer's, and the world's pretraining, take theirs from here): ``make_scheduler`` builds the CLI
schedules with ``transformers.get_scheduler`` (linear warm-up from 0, then linear / cosine decay to 0, or constant);
``constant_schedule`` (the RL library recipes) is ``get_scheduler("constant")``. Two shapes transformers does not
have are kept because results were produced with them: ``warmup_linear``, the schedule of the library recipes
(``SFTRecipe`` / ``DPORecipe``, the committed benchmark results), whose warm-up starts at ``lr / W`` on the first
step instead of 0; and ``warmup_decay``, a warm-up *times* a linear decay over the whole run with a floor (the
world's pretraining and the reward model: the shipped base model and the cached reward models were made with it).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

EvalFn = Callable[[torch.nn.Module, int], dict]
Hook = Callable[[object, dict], None]


@dataclass
class TrainState:
    """What the loop advances: optimizer steps (or RLHF rounds) done, and the metrics so far."""

    step: int = 0
    metrics: dict = field(default_factory=dict)


class Task:
    """One paradigm's training: subclasses set the attributes and implement ``step``.

    Attributes: ``model`` (the trained model, saved into ``final/``), ``tokenizer``, ``opt``, ``sched``, ``reg``;
    ``unit`` names one loop iteration in evaluation records ("step"; RLHF: "round"); ``command`` the CLI name.
    """

    command = "train"
    unit = "step"
    model: torch.nn.Module
    tokenizer: object = None
    opt: torch.optim.Optimizer
    sched: object
    reg: object

    def step(self, i: int, metrics: dict) -> dict:
        """Run step ``i`` (0-based) in place, append to ``metrics``; returns scalars for the log line. The key
        ``skipped`` (a reason) marks a step whose update was skipped."""
        raise NotImplementedError

    def new_metrics(self) -> dict:
        return {"evals": [], "skipped_steps": 0, "train_seconds": 0.0}

    def modules(self) -> dict[str, torch.nn.Module]:
        """Modules whose trainable parameters a checkpoint holds, by name prefix ('' = the model)."""
        return {"": self.model}

    def state_dict(self) -> dict:
        """The task's own running state (plain tensors and containers only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def finish(self, metrics: dict) -> None:
        """Add summary metrics at the end of a run."""

    def save_extra(self, final_dir) -> None:
        """Save trained modules besides ``model`` into ``final_dir``."""


def train(task: Task, state, end: int, *, total: int | None = None, eval_fn: EvalFn | None = None,
          eval_every: int = 0, hooks: list[Hook] = (), progress: str | None = None) -> None:
    """Run ``task.step`` for steps ``state.step .. end-1`` in place.

    After step ``i`` (``state.step = i + 1``): evaluate when ``eval_every`` divides ``state.step`` and it is before
    ``total`` (the end-of-run evaluation belongs to the caller), then call every ``hook(state, logs)``.
    ``progress``: a tqdm bar with this description when stderr is a terminal (else nothing; the CLI logs lines).
    ``metrics["train_seconds"]`` accumulates the time spent in steps (evaluation and hooks excluded).
    """
    total = end if total is None else total
    metrics = state.metrics
    metrics.setdefault("train_seconds", 0.0)
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=end, initial=state.step, desc=progress, leave=False, dynamic_ncols=True)
    try:
        for i in range(state.step, end):
            lr = task.opt.param_groups[0]["lr"]  # the step's learning rate (the scheduler advances inside)
            t0 = time.perf_counter()
            logs = task.step(i, metrics)
            logs.setdefault("lr", lr)
            dt = time.perf_counter() - t0
            metrics["train_seconds"] += dt
            logs.setdefault("s_per_step", dt)
            state.step = i + 1
            if eval_fn is not None and eval_every and state.step % eval_every == 0 and state.step < total:
                task.model.eval()
                metrics["evals"].append({task.unit: state.step, **eval_fn(task.model, state.step)})
                task.model.train()
            for hook in hooks:
                hook(state, logs)
            if bar is not None:
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if isinstance(v, float)}, refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def run_eval(task: Task, eval_fn: EvalFn | None, state, step: int) -> None:
    """The end-of-run evaluation record (model in eval mode)."""
    task.model.eval()
    if eval_fn is not None:
        state.metrics["evals"].append({task.unit: step, **eval_fn(task.model, step)})


# ----------------------------------------------------------------------------------------------------------- schedules
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def warmup_steps(steps: int, warmup_ratio: float) -> int:
    return max(1, int(round(warmup_ratio * steps))) if warmup_ratio > 0 else 0


def make_scheduler(opt: torch.optim.Optimizer, kind: str, steps: int, warmup_ratio: float):
    """``transformers.get_scheduler``: linear warm-up over ``round(warmup_ratio * steps)`` steps (from 0), then
    ``kind`` = linear / cosine decay to 0 at ``steps``, or constant."""
    from transformers import get_scheduler

    if kind not in SCHEDULES:
        from drpost.config import ConfigError

        raise ConfigError(f"option 'optim.schedule': unknown schedule {kind!r} (choose from {', '.join(SCHEDULES)})")
    return get_scheduler(SCHEDULES[kind], opt, num_warmup_steps=warmup_steps(steps, warmup_ratio),
                         num_training_steps=steps)


def warmup_linear(opt: torch.optim.Optimizer, steps: int, warmup_ratio: float):
    """The library recipes' schedule: ``(s + 1) / W`` during warm-up, then linear decay ``(steps - s) / (steps - W)``.

    Kept (instead of ``make_scheduler``) because the committed benchmark results were produced with it."""
    warm = warmup_steps(steps, warmup_ratio)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(1, steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def warmup_decay(opt: torch.optim.Optimizer, steps: int, warmup: int, floor: float = 0.0):
    """``min(1, (s + 1) / warmup) * max(floor, 1 - s / steps)``: a warm-up over ``warmup`` steps times a linear
    decay over the whole run that never goes below ``floor`` (the world's pretraining: floor 0.05; the reward model).

    Kept (instead of ``make_scheduler``) because the shipped base model and the cached reward models were made with
    it: the two factors overlap during the warm-up, which no ``transformers`` schedule does."""

    def f(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * max(floor, 1 - step / steps)

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def constant_schedule(opt: torch.optim.Optimizer):
    """Constant learning rate (the RL library recipes): the LR is exactly the optimizer's
    (``transformers.get_scheduler("constant")``)."""
    from transformers import get_scheduler

    return get_scheduler("constant", opt)


def recipe_from(cls, *groups, **explicit):
    """A recipe dataclass ``cls`` from config groups: every field of ``cls`` named like a field of a group takes
    its value (later groups win), then ``explicit`` values (the fields named differently, e.g. ``lr``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for g in groups:
        values.update({f.name: getattr(g, f.name) for f in dataclasses.fields(g) if f.name in names})
    return cls(**{**values, **explicit})


# ------------------------------------------------------------------------------------------------ shared step pieces
def kept_fraction(report) -> float | None:
    """Fraction of the regularizer's sample weights that are nonzero (averaged over blocks for layer scope);
    1.0 when the step reports no weights (every sample kept); None for a skipped step."""
    if report.skipped:
        return None
    if report.weights is None:
        return 1.0
    return float((report.weights != 0).float().mean())


def apply_update(task: Task, report, params: list, max_grad_norm: float | None, metrics: dict) -> bool:
    """After ``reg.step``: count a skipped step (and drop its gradients), or clip, step the optimizer and zero the
    gradients. Returns whether the update was applied."""
    if report.info.get("solver_fallback"):
        metrics["solver_fallbacks"] = metrics.get("solver_fallbacks", 0) + 1
    if report.skipped:
        metrics["skipped_steps"] += 1
        reasons = metrics.setdefault("skip_reasons", {})
        reasons[report.skip_reason] = reasons.get(report.skip_reason, 0) + 1
        task.opt.zero_grad(set_to_none=True)
        return False
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    task.opt.step()
    task.opt.zero_grad(set_to_none=True)
    return True


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen reference model in eval mode."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
