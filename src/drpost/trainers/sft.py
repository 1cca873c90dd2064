"""SFT with data regularization: ``SFTTask`` (one step), ``train_sft`` (the library loop) and ``run`` (the CLI).

Each step draws ``n`` general examples and ``m`` target examples (paper: n=8, m=1 drawn from the 16 targets), and
``DataRegularizer.step`` fills ``.grad`` with the regularized update; the optimizer and the LR schedule follow.
Baselines plug in as *samplers* (what the general batch is: a DSIR/LESS-selected pool, a pool mixed with the
upsampled targets, a 2x candidate batch for GREATS) and as *methods* (the feasible set), so every method shares the
same loop (``drpost.trainers.loop``), budget (steps x batch) and schedule.

Departures from a textbook SFT loop:
1. the loss function returns per-row summed losses; the regularizer normalizes (token mean over kept rows);
2. gradient clipping happens after the regularizer wrote ``.grad``; a skipped step (NaN/Inf in the loss, the
   geometry or the solver output) leaves the weights and the optimizer state (moments, step count) untouched and is
   counted in ``metrics["skipped_steps"]`` / ``["skip_reasons"]``; the LR schedule still advances, because it is
   indexed by step: the run keeps its configured length and warm-up/decay shape whatever is skipped;
3. an unconverged convex solve falls back to full_training for that step (``metrics["solver_fallbacks"]``).

The CLI run (``drpost.trainers.runner``) adds checkpoints, resume, logging and the final save. Try it (CPU, a
minute):

    drpost sft model.size=micro steps=50 save_every=10 output_dir=runs/try      # then add resume=auto
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from drpost.baselines.greats import sample_mean_loss
from drpost.data.collate import collate, tokenize_prompt_completion
from drpost.objectives.sft import causal_lm_loss
from drpost.step import DataRegularizer
from drpost.trainers.loop import Task, apply_update, run_eval, train, warmup_linear
from drpost.trainers.samplers import GeneralSampler, Guidance, guided_pool

__all__ = ["GeneralSampler", "Guidance", "LoopParts", "LoopState", "MethodSpec", "SFTRecipe", "SFTTask", "train_sft"]


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
    bf16: bool = False  # run each step's forward and backward under bf16 autocast (weights and optimizer stay fp32)
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
    loss: str = "token_sum"  # token_sum (standard) | sample_mean (per-sample token-mean loss) | greats (below)
    # greats: select with the per-sample token-mean loss, then train on the kept rows with the token mean over the
    # kept batch (GREATS's official update: a second forward/backward of the kept rows)
    guidance: dict | None = None  # general-pool distribution (trainers.samplers.Guidance); None = uniform
    target_batch_size: int | None = None  # override of the recipe's m (GREATS uses 2 target examples)


def encode_examples(tokenizer, examples: list[dict], max_length: int) -> list[dict]:
    rows = []
    for e in examples:
        r = tokenize_prompt_completion(tokenizer, e["prompt"], e["completion"], max_length, e.get("add_eos", True))
        if not any(t != -100 for t in r["labels"]):
            raise ValueError(f"example with prompt {e['prompt'][:40]!r} has no loss tokens after truncation "
                             f"to max_length={max_length}")
        rows.append(r)
    return rows


def linear_schedule(optimizer, steps: int, warmup_ratio: float):
    """The library recipes' schedule (``drpost.trainers.loop.warmup_linear``)."""
    return warmup_linear(optimizer, steps, warmup_ratio)


def prepare_model(model, recipe: SFTRecipe):
    if recipe.finetuning == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                         target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
    elif recipe.finetuning != "full":
        raise ValueError(f"option 'finetuning' must be 'full' or 'lora' here, got {recipe.finetuning!r}")
    return model


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
    autocast: torch.dtype | None = None  # forward + backward of the step under this autocast dtype (None: off)
    update: str = "regularizer"  # regularizer (reg.step) | greats (drpost.baselines.greats.greats_step)


def new_metrics(**extra) -> dict:
    return {"train_loss": [], "target_loss": [], "evals": [], "skipped_steps": 0, "skip_reasons": {},
            "solver_fallbacks": 0, "family_weight": {}, "train_seconds": 0.0, **extra}


class SFTTask(Task):
    """One SFT step over ``parts``; the sampler RNG and the family weight shares are its running state."""

    command = "sft"

    def __init__(self, parts: LoopParts, rng: random.Random, family_acc: dict | None = None, tokenizer=None,
                 extra_metrics: dict | None = None):
        self.parts, self.rng = parts, rng
        self.family_acc = family_acc if family_acc is not None else {}
        self.model, self.opt, self.sched, self.reg = parts.model, parts.opt, parts.sched, parts.reg
        self.tokenizer, self.extra_metrics = tokenizer, extra_metrics or {}
        self.last_report = None

    def new_metrics(self) -> dict:
        return new_metrics(**self.extra_metrics)

    def step(self, i: int, metrics: dict) -> dict:
        p = self.parts
        draw = p.sampler.draw()
        rows = [p.g_rows[j] if src == "g" else p.t_rows[j] for src, j in draw]
        tgt = [p.t_rows[self.rng.randrange(len(p.t_rows))] for _ in range(p.target_batch_size)]
        dev = p.params[0].device.type
        with torch.autocast(dev, dtype=p.autocast or torch.bfloat16, enabled=p.autocast is not None):
            if p.update == "greats":  # select on per-sample means, train on the kept rows' token mean
                from drpost.baselines.greats import greats_step

                report = greats_step(p.reg, p.model, collate(rows, p.pad), collate(tgt, p.pad))
            else:
                report = p.reg.step(general=collate(rows, p.pad), target=collate(tgt, p.pad), loss_fn=p.loss_fn)
        p.sampler.update(draw, report)  # guided sampling learns from the step's scores (uniform: no-op)
        if apply_update(self, report, p.params, p.max_grad_norm, metrics):
            metrics["train_loss"].append(report.loss)
            metrics["target_loss"].append(report.target_loss)
            _accumulate_family_weight(self.family_acc, report, draw, p.families)
        p.sched.step()
        self.last_report = report
        return {"loss": report.loss, "target_loss": report.target_loss,
                "skipped": report.skip_reason if report.skipped else None}

    def state_dict(self) -> dict:
        return {"sampler_rng": self.rng.getstate(), "family_acc": dict(self.family_acc),
                "sampler": self.parts.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        from drpost.trainers.checkpoint import _tuples

        self.rng.setstate(_tuples(state["sampler_rng"]))
        self.family_acc.clear()
        self.family_acc.update(state["family_acc"])
        self.parts.sampler.load_state_dict(state.get("sampler", {}))  # absent in checkpoints before guidance

    def finish(self, metrics: dict) -> None:
        metrics["family_weight"] = family_shares(self.family_acc)


def sft_steps(parts: LoopParts, state: LoopState, end: int, *, total: int | None = None,
              eval_fn: Callable[[torch.nn.Module, int], dict] | None = None, eval_every: int = 0,
              on_step: Callable[[LoopState, object], None] | None = None, progress: str | None = None) -> None:
    """Run steps ``state.step .. end-1`` in place (``drpost.trainers.loop.train`` over an ``SFTTask``);
    ``on_step(state, report)`` runs after every step."""
    task = SFTTask(parts, state.rng, state.family_acc)
    hooks = [lambda st, _logs: on_step(st, task.last_report)] if on_step is not None else []
    train(task, state, end, total=total, eval_fn=eval_fn, eval_every=eval_every, hooks=hooks, progress=progress)


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
    guidance = Guidance.of(spec.guidance)
    options = dict(spec.options)
    if guidance.on and spec.method in ("full_training", "target_only"):
        options.setdefault("report_scores", True)  # the guide learns from the scores these methods skip
    reg = DataRegularizer(model, method=spec.method, optimizer=opt, **options)
    guide = None
    if guidance.on:
        texts = [e["prompt"] + " " + e["completion"] for e in general] if general and "prompt" in general[0] \
            else None
        guide = guided_pool(guidance, rows=g_rows, texts=texts,
                            candidates=selected if spec.sampler == "selected" else None)
    parts = LoopParts(
        model=model, reg=reg, opt=opt, sched=sched, params=params,
        sampler=GeneralSampler(spec, len(g_rows), len(t_rows), recipe.general_batch_size, rng, selected, guide),
        g_rows=g_rows, t_rows=t_rows, families=[e.get("family") for e in general],
        loss_fn=sample_mean_loss if spec.loss == "sample_mean" else causal_lm_loss,
        pad=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        target_batch_size=spec.target_batch_size or recipe.target_batch_size, max_grad_norm=recipe.max_grad_norm,
        autocast=torch.bfloat16 if recipe.bf16 else None, update="greats" if spec.loss == "greats" else "regularizer")
    state = LoopState(0, rng, new_metrics(recipe=asdict(recipe), method=asdict(spec)))
    task = SFTTask(parts, rng, state.family_acc)
    train(task, state, recipe.steps, eval_fn=eval_fn, eval_every=recipe.eval_every,
          progress=spec.name if recipe.progress else None)
    task.finish(state.metrics)
    state.metrics["sampler_seconds"] = parts.sampler.seconds  # the sampler's overhead (wall time, not resumable)
    run_eval(task, eval_fn, state, recipe.steps)
    state.metrics["model"] = model
    return state.metrics


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
def build(config, device, sources=None) -> tuple[SFTTask, Callable | None]:
    """The SFT task of a ``drpost sft`` config, everything checked (model, data, options), and its evaluation;
    the model and data come through ``sources`` (``drpost.trainers.sources.Sources``; default: files only)."""
    from drpost.trainers import setup
    from drpost.trainers.loop import make_scheduler
    from drpost.trainers.sources import Sources

    sources = sources or Sources()
    model, tokenizer = sources.load_model(config.model, device)
    data = sources.sft_data(config, tokenizer)
    selected = _prefilter(config, data, tokenizer, model)  # LESS scores the base model, before the adapters
    model = setup.apply_finetuning(model, config.model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = setup.make_optimizer(params, config)
    sched = make_scheduler(opt, config.optim.schedule, config.steps, config.optim.warmup_ratio)
    reg = setup.make_regularizer(model, config, opt)
    rng = random.Random(config.seed)
    spec, sampler = _cli_sampler(config, data, rng, selected)
    if sampler.guide is not None:
        reg.report_scores = True  # the guide learns from the scores (full_training / target_only skip them)
    parts = LoopParts(model=model, reg=reg, opt=opt, sched=sched, params=params, sampler=sampler,
                      g_rows=data.g_rows, t_rows=data.t_rows, families=data.families, loss_fn=causal_lm_loss,
                      pad=tokenizer.pad_token_id, target_batch_size=config.target_batch_size,
                      max_grad_norm=config.optim.max_grad_norm)
    task = SFTTask(parts, rng, tokenizer=tokenizer,
                   extra_metrics={"data": data.source, "n_general": len(data.g_rows), "n_target": len(data.t_rows)})
    has_eval = bool(data.eval_rows or data.evaluate)
    return task, ((lambda m, step: _evaluate(m, tokenizer, data)) if has_eval else None)


def _prefilter(config, data, tokenizer, base) -> list[int] | None:
    """``sampler.prefilter``: the sorted pool indices an offline selector keeps (``sampler.prefilter_frac`` of the
    pool), or None. dsir = importance resampling on hashed word n-grams of the decoded rows; less = LESS scores
    (``drpost.baselines.less``: a LoRA warm-up on 5% of the pool, Adam-preconditioned gradient cosine to the target
    rows over 4 checkpoints) of the **base** model, so it runs before the run's own adapters are attached.
    Deterministic given ``seed``: a resumed run recomputes the same selection."""
    from drpost.trainers.samplers import prefilter_rows

    sc = config.sampler
    if sc.prefilter == "none":
        return None
    return prefilter_rows(sc.prefilter, base, tokenizer, data.g_rows, data.t_rows, sc.prefilter_frac, config.seed)


def _cli_sampler(config, data, rng, selected: list[int] | None) -> tuple[MethodSpec, GeneralSampler]:
    """``sampler.*``: the general pool of ``drpost sft`` (``selected``: the prefilter's kept rows, or None = all)
    and its distribution (uniform, or score-guided)."""
    sc = config.sampler
    method = config.regularizer.method
    spec = MethodSpec(method, method, sampler="pool" if selected is None else "selected",
                      sampler_options={"candidates": sc.candidates},
                      guidance={"mode": sc.mode, "exploration": sc.exploration, "temperature": sc.temperature,
                                "dim": sc.dim, "ridge": sc.ridge, "decay": sc.decay, "refresh": sc.refresh,
                                "features": "tokens"})
    g = Guidance.of(spec.guidance)
    guide = guided_pool(g, rows=data.g_rows, candidates=selected) if g.on else None
    return spec, GeneralSampler(spec, len(data.g_rows), len(data.t_rows), config.general_batch_size, rng,
                                selected, guide)


def run(config, sources=None) -> int:
    """``drpost sft``: build, validate, (resume,) train, checkpoint and save one run described by an SFTConfig.

    Everything (model, data, options, the checkpoint to resume) is checked before the first step; on an error
    nothing but ``output_dir/train.log`` (holding the error) is written. Outputs: ``config.yaml``, ``train.log``,
    ``metrics.json`` (losses, evals, skipped steps and their reasons, solver fallbacks), ``checkpoints/step-N/``
    every ``save_every`` steps and at the last one, ``tb/`` with ``log.tensorboard``, and ``final/`` (safetensors
    weights, or the LoRA adapters, + tokenizer). See ``drpost.trainers.runner``. ``sources``: where the model and
    data come from (default: hub / local models and data files; the CLI passes ``drpost.world.runs.WorldSources``).
    """
    from drpost.trainers.runner import run_task

    return run_task(config, build, sources)


def _evaluate(model, tokenizer, data) -> dict:
    """Token-mean loss on the eval rows, plus the data's own metrics (``data.evaluate``: a world setting's exact
    match)."""
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
    if data.evaluate is not None:
        out.update(data.evaluate(model))
    return out
