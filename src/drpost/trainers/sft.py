"""SFT with data regularization: ``train_sft`` (the loop, readable top to bottom) and ``run`` (the CLI entry).

Each step draws ``n`` general examples and ``m`` target examples (paper: n=8, m=1 drawn from the 16 targets), and
``DataRegularizer.step`` fills ``.grad`` with the regularized update; AdamW with linear warm-up/decay follows.
Baselines plug in as *samplers* (what the general batch is: a DSIR/LESS-selected pool, a pool mixed with the
upsampled targets, a 2x candidate batch for GREATS) and as *methods* (the feasible set), so every method shares the
same loop, budget (steps x batch) and schedule.

Departures from a textbook SFT loop:
1. the loss function returns per-row summed losses; the regularizer normalizes (DESIGN.md section 2);
2. gradient clipping happens after the regularizer wrote ``.grad``; a skipped step (NaN/Inf) leaves the weights
   and the optimizer state untouched and is counted in ``metrics["skipped_steps"]``.
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
    loss_fn = sample_mean_loss if spec.loss == "sample_mean" else causal_lm_loss
    sampler = GeneralSampler(spec, len(g_rows), len(t_rows), recipe.general_batch_size, rng, selected)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    metrics: dict = {"train_loss": [], "target_loss": [], "evals": [], "skipped_steps": 0,
                     "family_weight": {}, "recipe": asdict(recipe), "method": asdict(spec)}
    fam_w: dict[str, float] = {}
    t0 = time.perf_counter()
    it = range(recipe.steps)
    if recipe.progress:
        from tqdm import tqdm

        it = tqdm(it, desc=spec.name, leave=False)
    for step in it:
        draw = sampler.draw()
        rows = [g_rows[i] if src == "g" else t_rows[i] for src, i in draw]
        tgt = [t_rows[rng.randrange(len(t_rows))] for _ in range(spec.target_batch_size or recipe.target_batch_size)]
        report = reg.step(general=collate(rows, pad), target=collate(tgt, pad), loss_fn=loss_fn)
        if report.skipped:
            metrics["skipped_steps"] += 1
            opt.zero_grad(set_to_none=True)
            sched.step()
            continue
        if recipe.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        metrics["train_loss"].append(report.loss)
        metrics["target_loss"].append(report.target_loss)
        _accumulate_family_weight(fam_w, report, draw, general)
        if eval_fn is not None and recipe.eval_every and (step + 1) % recipe.eval_every == 0 and step + 1 < recipe.steps:
            model.eval()
            metrics["evals"].append({"step": step + 1, **eval_fn(model, step + 1)})
            model.train()
    metrics["train_seconds"] = time.perf_counter() - t0
    total = sum(fam_w.values())
    metrics["family_weight"] = {k: v / total for k, v in sorted(fam_w.items())} if total > 0 else {}
    model.eval()
    if eval_fn is not None:
        metrics["evals"].append({"step": recipe.steps, **eval_fn(model, recipe.steps)})
    metrics["model"] = model
    return metrics


def _accumulate_family_weight(acc: dict, report, draw, general) -> None:
    """Share of the update's gradient mass on each family: w_i N_i, averaged over blocks, clipped at 0."""
    if report.weights is None or report.counts is None:
        return
    w = (report.weights.clamp_min(0) * report.counts).mean(0)  # (n,)
    total = float(w.sum())
    if total <= 0 or not math.isfinite(total):
        return
    for (src, i), wi in zip(draw, (w / total).tolist()):
        fam = general[i]["family"] if src == "g" else "<target>"
        acc[fam] = acc.get(fam, 0.0) + wi
