"""SFT with data regularization: ``train_sft`` (the loop, readable top to bottom) and ``run`` (the CLI entry).

Each step draws ``n`` general examples and ``m`` target examples (paper: n=8, m=1 drawn from the 16 targets), and
``DataRegularizer.step`` fills ``.grad`` with the regularized update; AdamW with linear warm-up/decay follows.
Baselines plug in as *samplers* (what the general batch is: a DSIR/LESS-selected pool, a pool mixed with the
upsampled targets, a 2x candidate batch for GREATS) and as *methods* (the feasible set), so every method shares the
same loop, budget (steps x batch) and schedule.

Departures from a textbook SFT loop:
1. the loss function returns per-row summed losses; the regularizer normalizes (DESIGN.md section 2);
2. gradient clipping happens after the regularizer wrote ``.grad``; a skipped step (NaN/Inf in the loss, the
   geometry or the solver output) leaves the weights and the optimizer state (moments, step count) untouched and is
   counted in ``metrics["skipped_steps"]`` / ``["skip_reasons"]``; the LR schedule still advances, because it is
   indexed by step: the run keeps its configured length and warm-up/decay shape whatever is skipped;
3. an unconverged convex solve falls back to full_training for that step (``metrics["solver_fallbacks"]``).

``sft_steps`` is the one loop both entry points share; ``run`` adds checkpoints (``drpost.trainers.checkpoint``;
``save_every``, ``resume: auto | PATH``), logging and the final save. Try it (CPU, a minute):

    drpost sft model.size=micro steps=50 save_every=10 output_dir=runs/try      # then add resume=auto
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from drpost.data.collate import collate, tokenize_prompt_completion
from drpost.objectives.sft import causal_lm_loss
from drpost.step import DataRegularizer


@dataclass
class SFTRecipe:
    """Training hyperparameters shared by every method of a comparison (the budget)."""

    steps: int = 300
    general_batch_size: int = 8  # n general samples trained on per step
    target_batch_size: int = 1  # m target samples per step (paper: 1, drawn from the 16)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float | None = 1.0
    max_length: int = 96
    finetuning: str = "full"  # full | lora
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    eval_every: int = 0  # 0 = only at the end
    seed: int = 0
    progress: bool = False


@dataclass
class MethodSpec:
    """A compared method: the feasible set and its options, plus how the general batch is drawn."""

    name: str  # label in tables
    method: str = "full_training"  # DataRegularizer method
    options: dict = field(default_factory=dict)  # feasible-set / regularizer options
    sampler: str = "pool"  # pool | mixing | random_subset | candidates (GREATS) | selected (DSIR/LESS)
    sampler_options: dict = field(default_factory=dict)
    loss: str = "token_sum"  # token_sum (standard) | sample_mean (GREATS: per-sample token-mean loss)
    target_batch_size: int | None = None  # override of the recipe's m (GREATS uses 2 target examples)


def encode_examples(tokenizer, examples: list[dict], max_length: int) -> list[dict]:
    rows = []
    for e in examples:
        r = tokenize_prompt_completion(tokenizer, e["prompt"], e["completion"], max_length)
        if not any(t != -100 for t in r["labels"]):
            raise ValueError(f"example with prompt {e['prompt'][:40]!r} has no loss tokens after truncation "
                             f"to max_length={max_length}")
        rows.append(r)
    return rows


def sample_mean_loss(model, batch):
    """Per-sample token-mean loss (GREATS's per-sample loss): row loss / its tokens, count 1."""
    loss, counts = causal_lm_loss(model, batch)
    return loss / counts.clamp_min(1), torch.ones_like(counts)


def linear_schedule(optimizer, steps: int, warmup_ratio: float):
    warm = max(1, int(round(warmup_ratio * steps))) if warmup_ratio > 0 else 0

    def f(step):
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(1, steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def prepare_model(model, recipe: SFTRecipe):
    if recipe.finetuning == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                         target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
    elif recipe.finetuning != "full":
        raise ValueError(f"option 'finetuning' must be 'full' or 'lora' here, got {recipe.finetuning!r}")
    return model


class GeneralSampler:
    """Draws the general batch of a step (indices into the pool, plus target rows for mixing)."""

    def __init__(self, spec: MethodSpec, n_pool: int, n_target: int, n: int, rng: random.Random,
                 selected: list[int] | None = None):
        self.spec, self.n_pool, self.n_target, self.n, self.rng = spec, n_pool, n_target, n, rng
        self.selected = selected

    def draw(self) -> list[tuple[str, int]]:
        kind, rng, n = self.spec.sampler, self.rng, self.n
        if kind == "pool":
            return [("g", rng.randrange(self.n_pool)) for _ in range(n)]
        if kind == "candidates":  # GREATS: a candidate batch of twice the training batch
            return [("g", rng.randrange(self.n_pool)) for _ in range(2 * n)]
        if kind == "selected":  # DSIR / LESS: the offline-selected subset of the pool
            return [("g", self.selected[rng.randrange(len(self.selected))]) for _ in range(n)]
        if kind == "random_subset":  # draw n, keep a random frac of them: top-k's budget without its signal
            keep = max(1, int(float(self.spec.sampler_options.get("frac", 0.5)) * n + 0.5))
            return [("g", rng.randrange(self.n_pool)) for _ in range(n)][:keep]
        if kind == "mixing":  # target examples upsampled into the pool: each slot is a target w.p. p
            p = float(self.spec.sampler_options.get("target_prob", 0.1))
            return [("t", rng.randrange(self.n_target)) if rng.random() < p else ("g", rng.randrange(self.n_pool))
                    for _ in range(n)]
        raise ValueError(f"unknown sampler {kind!r}")


@dataclass
class LoopState:
    """What the loop advances (with the model, optimizer, scheduler and regularizer): saved by checkpoints."""

    step: int  # optimizer steps taken (skipped ones included)
    rng: random.Random  # draws general and target batches
    metrics: dict
    family_acc: dict = field(default_factory=dict)  # family -> summed weight share (see _accumulate_family_weight)


@dataclass
class LoopParts:
    """The fixed pieces of one SFT step, shared by ``train_sft`` (benchmarks) and ``run`` (the CLI)."""

    model: torch.nn.Module
    reg: DataRegularizer
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    params: list
    sampler: GeneralSampler
    g_rows: list[dict]
    t_rows: list[dict]
    families: list[str | None]  # family of each general row (None = unknown)
    loss_fn: Callable
    pad: int
    target_batch_size: int
    max_grad_norm: float | None


def new_metrics(**extra) -> dict:
    return {"train_loss": [], "target_loss": [], "evals": [], "skipped_steps": 0, "skip_reasons": {},
            "solver_fallbacks": 0, "family_weight": {}, "train_seconds": 0.0, **extra}


def sft_steps(parts: LoopParts, state: LoopState, end: int, *, total: int | None = None,
              eval_fn: Callable[[torch.nn.Module, int], dict] | None = None, eval_every: int = 0,
              on_step: Callable[[LoopState, object], None] | None = None, progress: str | None = None) -> None:
    """Run steps ``state.step .. end-1`` in place. A skipped step (non-finite loss, geometry or update) leaves the
    weights and the optimizer state untouched; the LR schedule still advances (it is indexed by step, so the run
    keeps its configured length and a resumed run its schedule). Evaluates every ``eval_every`` steps before
    ``total``; ``on_step(state, report)`` runs after every step (logging, checkpoints)."""
    total = end if total is None else total
    rng, metrics, model = state.rng, state.metrics, parts.model
    t0 = time.perf_counter()
    it = range(state.step, end)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=progress, total=end, initial=state.step, leave=False)
    for step in it:
        draw = parts.sampler.draw()
        rows = [parts.g_rows[i] if src == "g" else parts.t_rows[i] for src, i in draw]
        tgt = [parts.t_rows[rng.randrange(len(parts.t_rows))] for _ in range(parts.target_batch_size)]
        report = parts.reg.step(general=collate(rows, parts.pad), target=collate(tgt, parts.pad),
                                loss_fn=parts.loss_fn)
        if report.info.get("solver_fallback"):
            metrics["solver_fallbacks"] += 1
        if report.skipped:
            metrics["skipped_steps"] += 1
            reasons = metrics["skip_reasons"]
            reasons[report.skip_reason] = reasons.get(report.skip_reason, 0) + 1
            parts.opt.zero_grad(set_to_none=True)
        else:
            if parts.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(parts.params, parts.max_grad_norm)
            parts.opt.step()
            parts.opt.zero_grad(set_to_none=True)
            metrics["train_loss"].append(report.loss)
            metrics["target_loss"].append(report.target_loss)
            _accumulate_family_weight(state.family_acc, report, draw, parts.families)
        parts.sched.step()
        state.step = step + 1
        if eval_fn is not None and eval_every and state.step % eval_every == 0 and state.step < total:
            model.eval()
            metrics["evals"].append({"step": state.step, **eval_fn(model, state.step)})
            model.train()
        if on_step is not None:
            metrics["train_seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            on_step(state, report)
    metrics["train_seconds"] += time.perf_counter() - t0


def family_shares(acc: dict) -> dict:
    total = sum(acc.values())
    return {k: v / total for k, v in sorted(acc.items())} if total > 0 else {}


def train_sft(model, tokenizer, general: list[dict], target: list[dict], spec: MethodSpec, recipe: SFTRecipe,
              eval_fn: Callable[[torch.nn.Module, int], dict] | None = None, selected: list[int] | None = None,
              general_rows: list[dict] | None = None) -> dict:
    """Train ``model`` in place; returns metrics (losses, evals, weight shares by family, timings)."""
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    model = prepare_model(model, recipe)
    model.train()
    g_rows = general_rows if general_rows is not None else encode_examples(tokenizer, general, recipe.max_length)
    t_rows = encode_examples(tokenizer, target, recipe.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = linear_schedule(opt, recipe.steps, recipe.warmup_ratio)
    reg = DataRegularizer(model, method=spec.method, optimizer=opt, **spec.options)
    parts = LoopParts(
        model=model, reg=reg, opt=opt, sched=sched, params=params,
        sampler=GeneralSampler(spec, len(g_rows), len(t_rows), recipe.general_batch_size, rng, selected),
        g_rows=g_rows, t_rows=t_rows, families=[e.get("family") for e in general],
        loss_fn=sample_mean_loss if spec.loss == "sample_mean" else causal_lm_loss,
        pad=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        target_batch_size=spec.target_batch_size or recipe.target_batch_size, max_grad_norm=recipe.max_grad_norm)
    state = LoopState(0, rng, new_metrics(recipe=asdict(recipe), method=asdict(spec)))
    sft_steps(parts, state, recipe.steps, eval_fn=eval_fn, eval_every=recipe.eval_every,
              progress=spec.name if recipe.progress else None)
    metrics = state.metrics
    metrics["family_weight"] = family_shares(state.family_acc)
    model.eval()
    if eval_fn is not None:
        metrics["evals"].append({"step": recipe.steps, **eval_fn(model, recipe.steps)})
    metrics["model"] = model
    return metrics


def _accumulate_family_weight(acc: dict, report, draw, families: list[str | None]) -> None:
    """Share of the update's gradient mass on each family: w_i N_i, averaged over blocks, clipped at 0."""
    if report.weights is None or report.counts is None:
        return
    w = (report.weights.clamp_min(0) * report.counts).mean(0)  # (n,)
    total = float(w.sum())
    if total <= 0 or not math.isfinite(total):
        return
    for (src, i), wi in zip(draw, (w / total).tolist()):
        fam = families[i] if src == "g" else "<target>"
        if fam is not None:
            acc[fam] = acc.get(fam, 0.0) + wi


# ---------------------------------------------------------------------------------------------------- the CLI run
def run(config) -> int:
    """``drpost sft``: build, validate, (resume,) train, checkpoint and save one run described by an SFTConfig.

    Everything (model, data, options, the checkpoint to resume) is checked before the first step; on an error
    nothing but ``output_dir/train.log`` (holding the error) is written. Outputs: ``config.yaml``, ``train.log``,
    ``metrics.json`` (losses, evals, skipped steps and their reasons, solver fallbacks), ``checkpoints/step-N/``
    every ``save_every`` steps, ``tb/`` with ``log.tensorboard``, and ``final/`` (safetensors weights + tokenizer).
    """
    from drpost.config import ConfigError
    from drpost.data.formats import DataError
    from drpost.trainers.setup import log, run_log

    with run_log(config.output_dir):
        try:
            return _run(config)
        except (ConfigError, DataError) as e:
            log.error("%s", e)
            raise
        except Exception:
            log.exception("drpost sft failed")
            raise


def _run(config) -> int:
    import sys
    from pathlib import Path

    from drpost.config import save_resolved, to_dict
    from drpost.trainers import checkpoint as ckpt
    from drpost.trainers import setup

    log = setup.log
    out = Path(config.output_dir)
    torch.manual_seed(config.seed)
    device = setup.resolve_device(config.device)
    # 1. everything that can be wrong is checked here, before anything but the log is written
    model, tokenizer = setup.load_model(config.model, device)
    data = setup.load_sft_data(config, tokenizer)
    model = setup.apply_finetuning(model, config.model)
    model.train()
    resume_from = ckpt.resolve_resume(config.resume, out)
    state_in = ckpt.load_checkpoint(resume_from, map_location=device) if resume_from is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = setup.make_optimizer(params, config)
    sched = setup.make_schedule(opt, config.steps, config.optim.warmup_ratio, config.optim.schedule)
    reg = setup.make_regularizer(model, config, opt)
    rng = random.Random(config.seed)
    spec = MethodSpec(config.regularizer.method, config.regularizer.method)
    parts = LoopParts(model=model, reg=reg, opt=opt, sched=sched, params=params,
                      sampler=GeneralSampler(spec, len(data.g_rows), len(data.t_rows), config.general_batch_size, rng),
                      g_rows=data.g_rows, t_rows=data.t_rows, families=data.families, loss_fn=causal_lm_loss,
                      pad=tokenizer.pad_token_id, target_batch_size=config.target_batch_size,
                      max_grad_norm=config.optim.max_grad_norm)
    state = LoopState(0, rng, new_metrics(data=data.source, n_general=len(data.g_rows), n_target=len(data.t_rows)))
    if state_in is not None:
        _restore(parts, state, state_in)
        log.info("resumed from %s at step %d", state_in.path, state.step)
        state.metrics["resumed_from"] = str(state_in.path)
    elif config.resume == "auto":
        log.info("resume=auto: no checkpoint in %s, starting fresh", out / ckpt.CHECKPOINT_DIR)

    # 2. the run directory
    save_resolved(config, out)
    removed = ckpt.clean_stale(out / ckpt.CHECKPOINT_DIR)
    if removed:
        log.info("removed %d incomplete checkpoint directories left by an interrupted save", len(removed))
    writer = _tensorboard(config, out)
    log.info("drpost sft: %s, %d general / %d target rows, method %s, %d steps from step %d, device %s",
             data.source, len(data.g_rows), len(data.t_rows), config.regularizer.method, config.steps, state.step,
             device)

    def eval_fn(m, step):
        return _evaluate(m, tokenizer, data)

    def on_step(st: LoopState, report) -> None:
        metrics = st.metrics
        if report.skipped:
            log.warning("step %d skipped: %s (parameters and optimizer state untouched)", st.step, report.skip_reason)
        if st.step % config.log.log_every == 0 or st.step == config.steps:
            lr = opt.param_groups[0]["lr"]
            log.info("step %d/%d loss %.4f target_loss %.4f lr %.3g skipped %d", st.step, config.steps,
                     report.loss, report.target_loss, lr, metrics["skipped_steps"])
        if writer is not None and not report.skipped:
            writer.add_scalar("train/loss", report.loss, st.step)
            writer.add_scalar("train/target_loss", report.target_loss, st.step)
            writer.add_scalar("train/lr", opt.param_groups[0]["lr"], st.step)
        if writer is not None and metrics["evals"] and metrics["evals"][-1]["step"] == st.step:
            for k, v in metrics["evals"][-1].items():
                if k != "step":
                    writer.add_scalar(f"eval/{k}", v, st.step)
        if config.save_every and st.step % config.save_every == 0 and st.step < config.steps:
            path = _save(out, parts, st, config)
            log.info("checkpoint %s", path)

    progress = "sft" if sys.stderr.isatty() else None
    sft_steps(parts, state, config.steps, eval_fn=eval_fn, eval_every=config.eval_every, on_step=on_step,
              progress=progress)

    # 3. final evaluation, weights, metrics
    metrics = state.metrics
    metrics["family_weight"] = family_shares(state.family_acc)
    model.eval()
    if data.eval_rows:
        metrics["evals"].append({"step": config.steps, **_evaluate(model, tokenizer, data)})
    final = out / "final"
    model.save_pretrained(final)  # safetensors (adapters only for LoRA)
    tokenizer.save_pretrained(final)
    metrics["steps"] = state.step
    metrics["config"] = to_dict(config)
    _write_json(out / "metrics.json", metrics)
    if writer is not None:
        writer.close()
    log.info("done: %d steps (%d skipped, %d solver fallbacks); final weights in %s", state.step,
             metrics["skipped_steps"], metrics["solver_fallbacks"], final)
    return 0


def _evaluate(model, tokenizer, data) -> dict:
    """Token-mean loss on the eval rows; exact match on world examples (greedy)."""
    out = {}
    if data.eval_rows:
        pad = tokenizer.pad_token_id
        dev = next(model.parameters()).device
        total = count = 0.0
        with torch.no_grad():
            for s in range(0, len(data.eval_rows), 64):
                batch = {k: v.to(dev) for k, v in collate(data.eval_rows[s:s + 64], pad).items()}
                sums, counts = causal_lm_loss(model, batch)
                total, count = total + float(sums.sum()), count + float(counts.sum())
        out["eval_loss"] = total / max(count, 1.0)
    if data.eval_examples:
        from drpost.world.evaluate import exact_match

        out["exact_match"] = exact_match(model, tokenizer, data.eval_examples)
    return out


def _trainer_state(parts: LoopParts, state: LoopState) -> dict:
    from drpost.trainers import checkpoint as ckpt

    return {"optimizer": parts.opt.state_dict(), "scheduler": parts.sched.state_dict(),
            "sampler_rng": state.rng.getstate(), "rng": ckpt.rng_state(),
            "regularizer": ckpt.regularizer_state(parts.reg)}


def _save(out, parts: LoopParts, state: LoopState, config):
    from drpost.config import to_dict
    from drpost.trainers import checkpoint as ckpt

    progress = {"step": state.step, "metrics": state.metrics, "family_acc": state.family_acc,
                "config": to_dict(config)}
    return ckpt.save_checkpoint(out / ckpt.CHECKPOINT_DIR, state.step, ckpt.trainable_weights(parts.model),
                                _trainer_state(parts, state), progress)


def _restore(parts: LoopParts, state: LoopState, c) -> None:
    from drpost.trainers import checkpoint as ckpt

    ckpt.load_weights(parts.model, c.weights, c.path)
    ts = c.trainer_state
    try:
        parts.opt.load_state_dict(ts["optimizer"])
        parts.sched.load_state_dict(ts["scheduler"])
        state.rng.setstate(ckpt._tuples(ts["sampler_rng"]))
        ckpt.load_regularizer_state(parts.reg, ts["regularizer"])
        ckpt.set_rng_state(ts["rng"])
        state.step = int(c.progress["step"])
        state.metrics = c.progress["metrics"]
        state.family_acc = c.progress["family_acc"]
    except (KeyError, ValueError, TypeError) as e:
        raise ckpt.CheckpointError(f"checkpoint {c.path} does not fit this run (optimizer or options changed?): "
                                   f"{e}") from None


def _tensorboard(config, out):
    from drpost.trainers.setup import log

    if config.log.wandb:
        log.warning("log.wandb is not wired into drpost sft yet; metrics go to metrics.json (and TensorBoard)")
    if not config.log.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("log.tensorboard=true but the 'tensorboard' package is not installed (pip install tensorboard);"
                    " continuing without TensorBoard, metrics.json is still written")
        return None
    return SummaryWriter(str(out / "tb"))


def _write_json(path, obj) -> None:
    import json
    import os

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)
