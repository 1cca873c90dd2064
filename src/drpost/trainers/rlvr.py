"""RLVR with data regularization: GRPO with verifiable rewards, curated by a target direction.

    from drpost.trainers.rlvr import RLVRRecipe, train_rlvr
    from drpost.trainers.rlhf import RLMethod
    metrics = train_rlvr(policy, ref, reward_fn, tokenizer, general_prompts, target_prompts,
                         RLMethod("LayerWiseSubset", "layerwise_subset", {"selection": "filter", "frac": 1.0}),
                         RLVRRecipe(steps=40))

CLI: ``drpost rlvr output_dir=runs/rlvr regularizer.method=layerwise_subset steps=40`` (``run(config)``).

One step:
  1. sample ``prompts_per_step`` general prompts and ``target_prompts`` target prompts, ``group_size`` completions
     each (temperature sampling, at most ``max_new_tokens``); rewards from the verifier (1 = correct);
  2. group-relative advantages ``(r - mean_group) / (std_group + eps)`` broadcast over each completion's tokens;
     old and reference log-probs in one no-grad pass;
  3. ``num_iterations`` regularized updates on this batch: the general batch is every general completion, grouped
     into samples per record or per prompt group (``sample_unit``), the target batch every target completion under
     the target objective (``reward`` / ``token_pg`` / ``train_loss``); AdamW step after each.
Target prompts come from a held-out split of the target problem type, or from the general training prompts
(``rlvr_arith_trainsrc``, the paper's ablation).

Departures from textbook GRPO (Shao et al. 2024):
1. Token-mean aggregation over all kept completions (DAPO / verl default) instead of a per-sequence mean; the
   regularizer does the normalization from per-row summed losses.
2. The KL term (k3 to the frozen reference, ``kl_coef``) is part of every general row's loss, so it is curated with
   it; with ``kl_coef=0`` no reference pass is made for the loss (the reference still measures KL in evaluation).
3. The target rollouts only define the target direction and are never trained on (except by ``target_only`` or
   convex sets with slack).
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass

import torch

from drpost.objectives.advantages import group_advantages
from drpost.objectives.grpo import group_sample_index
from drpost.objectives.logprobs import response_mask
from drpost.objectives.rl_target import normalize_rewards
from drpost.step import DataRegularizer
from drpost.trainers.rl_common import (
    MixedRLLoss,
    encode_prompt,
    forward_stats,
    rollout_batch,
    sample_generate,
    trim,
)
from drpost.trainers.rlhf import RLMethod


@dataclass
class RLVRRecipe:
    """GRPO hyperparameters shared by every compared method (the budget)."""

    steps: int = 40
    prompts_per_step: int = 4  # general prompts per step
    target_prompts: int = 2  # target prompts per step (define g_T only)
    group_size: int = 8
    num_iterations: int = 1
    lr: float = 3e-4
    max_grad_norm: float | None = 1.0
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    scale_rewards: bool = True
    sample_unit: str = "record"  # record | group
    max_new_tokens: int = 8
    temperature: float = 1.0
    target_objective: str = "reward"
    eval_every: int = 0
    seed: int = 0


@torch.no_grad()
def grpo_rollouts(policy, ref, reward_fn, tokenizer, examples: list[dict], recipe: RLVRRecipe,
                  generator: torch.Generator, is_target: bool, sample_offset: int = 0) -> tuple[dict, dict]:
    """Group rollouts of ``examples`` (each repeated ``group_size`` times, contiguous). Returns (batch, stats).

    batch keys (R, T): input_ids, attention_mask, labels, old_logps, ref_logps, advantages (group advantage on every
    response token); (R,): rewards, is_target, seq_weight (group-normalized reward), sample_index (per record or per
    group, by ``recipe.sample_unit``).
    """
    k = recipe.group_size
    reps = [e for e in examples for _ in range(k)]
    prompts = [encode_prompt(tokenizer, e["prompt"]) for e in reps]
    responses = sample_generate(policy, tokenizer, prompts, recipe.max_new_tokens, recipe.temperature,
                                generator=generator)
    batch = rollout_batch(prompts, responses, tokenizer.pad_token_id)
    old, _ = forward_stats(policy, batch)  # (R, T)
    refl = forward_stats(ref, batch)[0] if recipe.kl_coef else torch.zeros_like(old)
    rewards = reward_fn(prompts, responses, reps).to(old.dtype)  # (R,)
    adv = group_advantages(rewards, k, normalize_std=recipe.scale_rewards)  # (R,)
    mask = response_mask(batch["labels"]).to(old.dtype)
    R = len(reps)
    if recipe.sample_unit == "group":
        sidx = group_sample_index(len(examples), k)
    else:
        sidx = torch.arange(R)
    batch.update(old_logps=old, ref_logps=refl, advantages=adv[:, None] * mask, rewards=rewards,
                 is_target=torch.full((R,), float(is_target)),
                 seq_weight=normalize_rewards(rewards, "group", k) if is_target else torch.zeros(R),
                 sample_index=sidx + sample_offset)
    stats = {"reward": float(rewards.mean()),
             "solved_groups": float((rewards.view(-1, k).max(1).values > 0).float().mean()),
             "response_len": float(mask.sum(-1).mean())}
    return batch, stats


def train_rlvr(policy, ref, reward_fn, tokenizer, general: list[dict], target: list[dict], spec: RLMethod,
               recipe: RLVRRecipe, eval_fn=None, progress=None) -> dict:
    """Train ``policy`` (a causal LM, in place) with GRPO; returns metrics (the trained policy under "model").

    reward_fn(prompt_ids, response_ids, examples) -> (R,) rewards. ``ref`` is frozen (KL penalty and evaluation).
    """
    if spec.baseline is not None:
        raise ValueError(f"RLVR has no baseline {spec.baseline!r} (IIF is an RLHF baseline)")
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    reg = DataRegularizer(policy, method=spec.method, optimizer=opt, **spec.options)
    stats: dict = {}
    loss_fn = MixedRLLoss("grpo", recipe.target_objective, recipe.clip_eps, kl_coef=recipe.kl_coef, stats=stats)
    metrics: dict = {"steps": [], "evals": [], "skipped_steps": 0, "recipe": asdict(recipe), "method": asdict(spec)}
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        g_ex = [general[rng.randrange(len(general))] for _ in range(recipe.prompts_per_step)]
        t_ex = [target[rng.randrange(len(target))] for _ in range(recipe.target_prompts)]
        gb, gstats = grpo_rollouts(policy, ref, reward_fn, tokenizer, g_ex, recipe, gen, False)
        tb, tstats = grpo_rollouts(policy, ref, reward_fn, tokenizer, t_ex, recipe, gen, True)
        gb, tb = trim(gb), trim(tb)
        kept = []
        for _ in range(recipe.num_iterations):
            report = reg.step(general=gb, target=tb, loss_fn=loss_fn)
            if report.skipped:
                metrics["skipped_steps"] += 1
                opt.zero_grad(set_to_none=True)
                continue
            if report.weights is not None:
                kept.append(float((report.weights > 0).float().mean()))
            if recipe.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        metrics["steps"].append({"step": step + 1, "general_reward": gstats["reward"],
                                 "target_reward": tstats["reward"], "solved_groups": gstats["solved_groups"],
                                 "kept_frac": sum(kept) / len(kept) if kept else None,
                                 **{k: float(v) for k, v in stats.items()}})
        if progress:
            progress(metrics["steps"][-1])
        if eval_fn is not None and recipe.eval_every and (step + 1) % recipe.eval_every == 0 and step + 1 < recipe.steps:
            metrics["evals"].append({"step": step + 1, **eval_fn(policy, step + 1)})
    metrics["train_seconds"] = time.perf_counter() - t0
    policy.eval()
    if eval_fn is not None:
        metrics["evals"].append({"step": recipe.steps, **eval_fn(policy, recipe.steps)})
    metrics["model"] = policy
    return metrics


def run(config) -> int:
    """``drpost rlvr``: GRPO on the world's ``rlvr_arith`` setting (or given model / prompt files)."""
    import json

    from drpost.trainers import setup
    from drpost.trainers.rl_common import (
        evaluate_policy,
        load_prompt_records,
        start_rl_run,
        verifier_reward_fn,
    )

    run_ = start_rl_run(config, "rlvr_arith")
    out, policy, tok = run_.out, run_.policy, run_.tokenizer
    data, general, target = run_.data, run_.general, run_.target
    for name, recs in (("data.general", general), ("data.target", target)):
        if any("answer" not in r or "family" not in r for r in recs):
            from drpost.data.formats import DataError

            raise DataError(f"option '{name}': RLVR prompt records need 'answer' and 'family' (the world verifier)")
    ref = copy.deepcopy(policy).eval()
    g = config.grpo
    recipe = RLVRRecipe(steps=config.steps, prompts_per_step=g.prompts_per_step,
                        target_prompts=config.target_batch_size, group_size=g.group_size,
                        num_iterations=g.num_iterations, lr=config.optim.lr, max_grad_norm=config.optim.max_grad_norm,
                        clip_eps=g.clip_eps, kl_coef=g.kl_coef, scale_rewards=g.scale_rewards,
                        sample_unit=g.sample_unit, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                        target_objective=g.target_objective, eval_every=config.eval_every, seed=config.seed)
    rc = config.regularizer
    spec = RLMethod(rc.method, rc.method, setup.regularizer_options(rc))
    reward_fn = verifier_reward_fn(tok)
    test = data.target_test[:100] if config.data.eval is None else load_prompt_records(config.data.eval, None)

    def eval_fn(model, step):
        return evaluate_policy(model, ref, tok, test, reward_fn, max_new_tokens=g.max_new_tokens,
                               retention=data.retention if config.data.general is None else None)

    def progress(r):
        setup.log.info("step %d: general reward %.3f target reward %.3f", r["step"], r["general_reward"],
                       r["target_reward"])

    metrics = train_rlvr(policy, ref, reward_fn, tok, general, target, spec, recipe, eval_fn, progress)
    metrics.pop("model")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    return 0
