"""RLHF with data regularization: PPO (value head, GAE, KL penalty to a frozen reference) on a learned reward.

    from drpost.trainers.rlhf import RLHFRecipe, RLMethod, train_rlhf
    metrics = train_rlhf(policy, ref, reward_model, tokenizer, general_prompts, target_prompts,
                         RLMethod("LayerWiseSubset", "layerwise_subset", {"frac": 0.5}), RLHFRecipe(rounds=20))

CLI: ``drpost rlhf output_dir=runs/rlhf regularizer.method=layerwise_subset steps=20`` (``run(config)``).

One round:
  1. sample ``rollout_batch_size`` general prompts and ``target_rollouts`` target prompts; generate responses
     (temperature / top-p sampling, at most ``max_new_tokens``);
  2. score them with the reward model; old log-probs, values (value head) and reference log-probs in one no-grad
     pass; per-token rewards ``-beta KL_t`` plus the score on the last token; GAE; whitened advantages;
  3. ``ppo_epochs`` passes over the general records in shuffled mini-batches of ``mini_batch_size``; each mini-batch
     is the general batch of one ``DataRegularizer.step`` whose target batch is ``target_batch_size`` of the round's
     target records under the target objective (``reward`` / ``token_pg`` / ``train_loss``); AdamW step;
  4. the adaptive KL controller sees the round's mean sequence KL.
Baseline IIF (``RLMethod(..., baseline="iif")``): between 2 and 3, score every general record of the round against
the gradient of the whole target batch (``global_subset`` with ``selection="filter", frac=1``), drop the records with
a negative score, and run the PPO epochs with ``full_training`` on the rest.

Departures from textbook PPO (Ziegler et al. 2019 / TRL's classic PPOTrainer):
1. The value head reads the *detached* last hidden state (``DetachedValuePolicy``). The policy's per-sample
   gradients, which the regularizer scores and combines, are then pure policy-gradient terms; the head is trained on
   the full mini-batch's value loss (token mean) with its own learning rate (``value_lr``, as the paper's 5e-4
   value lr), whatever subset the regularizer picks for the policy.
2. The loss is per row (summed token terms); the regularizer normalizes (token mean over the kept records).
3. Target rollouts are generated every round alongside the general ones and only define the target direction;
   they are never trained on (except by ``target_only``, or convex sets with slack).
4. Constant learning rate; gradient clipping after the regularizer wrote ``.grad``.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from drpost.objectives.advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalized_rewards,
    whiten,
)
from drpost.objectives.logprobs import response_mask
from drpost.objectives.ppo import PolicyValueOutput, ValueHead
from drpost.objectives.rl_target import normalize_rewards
from drpost.step import DataRegularizer
from drpost.trainers.rl_common import (
    MixedRLLoss,
    encode_prompt,
    forward_stats,
    rollout_batch,
    sample_generate,
    take,
    trim,
)


@dataclass
class RLHFRecipe:
    """PPO hyperparameters shared by every compared method (the budget)."""

    rounds: int = 20
    rollout_batch_size: int = 32  # general prompts per round
    target_rollouts: int = 16  # target prompts rolled out per round (define g_T only)
    mini_batch_size: int = 8  # general records per regularized step
    target_batch_size: int = 8  # target records per step
    ppo_epochs: int = 2
    lr: float = 3e-4
    value_lr: float = 1e-3
    max_grad_norm: float | None = 1.0
    clip_eps: float = 0.2
    value_clip: float | None = 0.2
    vf_coef: float = 1.0
    kl_coef: float = 0.05
    adaptive_kl: bool = False
    kl_target: float = 2.0
    kl_horizon: int = 2000
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    max_new_tokens: int = 12
    temperature: float = 1.0
    top_p: float = 1.0
    target_objective: str = "reward"
    eval_every: int = 0
    seed: int = 0


@dataclass
class RLMethod:
    """A compared method: the regularizer's feasible set and options, or a baseline that curates whole rounds."""

    name: str
    method: str = "full_training"
    options: dict = field(default_factory=dict)
    baseline: str | None = None  # None | "iif"


class DetachedValuePolicy(nn.Module):
    """A causal LM plus a value head on its *detached* last hidden state (departure 1 of the module docstring).

    forward(input_ids (R, T), attention_mask (R, T), **kw) -> PolicyValueOutput(logits (R, T, V), values (R, T)).
    """

    def __init__(self, policy: nn.Module, value_head: ValueHead | None = None):
        super().__init__()
        self.policy = policy
        cfg = policy.config
        self.value_head = value_head or ValueHead(cfg.hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kw) -> PolicyValueOutput:
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kw)
        return PolicyValueOutput(logits=out.logits, values=self.value_head(out.hidden_states[-1].detach()))


# --------------------------------------------------------------------------- rollouts
@torch.no_grad()
def ppo_rollouts(model: DetachedValuePolicy, ref, reward_fn, tokenizer, examples: list[dict], recipe: RLHFRecipe,
                 kl_coef: float, generator: torch.Generator, is_target: bool) -> tuple[dict, dict]:
    """Generate, score and annotate one set of rollouts. Returns (batch of records, round statistics).

    batch keys (R, T): input_ids, attention_mask, labels, old_logps, old_values, returns, advantages;
    (R,): scores, is_target, seq_weight (normalized score, used by the ``reward`` target objective).
    """
    prompts = [encode_prompt(tokenizer, e["prompt"]) for e in examples]
    responses = sample_generate(model.policy, tokenizer, prompts, recipe.max_new_tokens, recipe.temperature,
                                recipe.top_p, generator)
    batch = rollout_batch(prompts, responses, tokenizer.pad_token_id)
    logps, values = forward_stats(model, batch)  # (R, T) each
    ref_logps, _ = forward_stats(ref, batch)
    scores = reward_fn(prompts, responses, examples).to(logps.dtype)  # (R,)
    mask = response_mask(batch["labels"])  # (R, T)
    rewards, kl = kl_penalized_rewards(scores, logps, ref_logps, mask, kl_coef)
    adv, returns = gae(rewards, values, mask, recipe.gamma, recipe.lam)
    if recipe.whiten_advantages and mask.sum() > 1:
        adv = whiten(adv, mask)
    R = len(examples)
    batch.update(old_logps=logps, old_values=values, returns=returns, advantages=adv, scores=scores,
                 is_target=torch.full((R,), float(is_target)),
                 seq_weight=normalize_rewards(scores, "batch") if is_target else torch.zeros(R))
    stats = {"score": float(scores.mean()), "kl": float(kl.sum(-1).mean()),
             "response_len": float(mask.sum(-1).float().mean())}
    return batch, stats


def iif_keep(reg: DataRegularizer, general: dict, target: dict, loss_fn) -> Tensor:
    """IIF: indices of the general records whose gradient does not oppose the target gradient (score >= 0).

    ``reg`` must be a ``global_subset`` / ``filter`` / ``frac=1`` regularizer; its step writes ``.grad``, which the
    caller discards. Returns (k,) long indices into the general records.
    """
    report = reg.step(general=general, target=target, loss_fn=loss_fn)
    if report.skipped or report.scores is None:
        return torch.arange(general["input_ids"].shape[0])
    return torch.nonzero(report.scores >= 0).flatten()


# --------------------------------------------------------------------------- the loop
def train_rlhf(policy, ref, reward_fn, tokenizer, general: list[dict], target: list[dict], spec: RLMethod,
               recipe: RLHFRecipe, eval_fn=None, progress=None) -> dict:
    """Train ``policy`` (a causal LM, in place) with PPO; returns metrics (the trained policy under "model").

    reward_fn(prompt_ids, response_ids, examples) -> (R,) scores. ``ref`` is frozen. ``eval_fn(policy, round)`` ->
    dict, called every ``recipe.eval_every`` rounds and at the end.
    """
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    model = DetachedValuePolicy(policy)
    model.value_head.to(next(policy.parameters()).device)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    vparams = list(model.value_head.parameters())
    opt = torch.optim.AdamW([{"params": params, "lr": recipe.lr}, {"params": vparams, "lr": recipe.value_lr}],
                            weight_decay=0.0)
    method = "full_training" if spec.baseline == "iif" else spec.method
    reg = DataRegularizer(policy, method=method, optimizer=opt, **(spec.options if spec.baseline is None else {}))
    iif = DataRegularizer(policy, method="global_subset", selection="filter", frac=1.0) \
        if spec.baseline == "iif" else None
    stats: dict = {}
    mixed = MixedRLLoss("ppo", recipe.target_objective, recipe.clip_eps, recipe.value_clip, recipe.vf_coef,
                        stats=stats)

    def loss_fn(_lm, batch):  # the regularizer passes the LM; the loss needs the value head too
        return mixed(model, batch)

    kl_ctl = (AdaptiveKLController(recipe.kl_coef, recipe.kl_target, recipe.kl_horizon) if recipe.adaptive_kl
              else FixedKLController(recipe.kl_coef))
    metrics: dict = {"rounds": [], "evals": [], "skipped_steps": 0, "recipe": asdict(recipe), "method": asdict(spec)}
    t0 = time.perf_counter()
    for rnd in range(recipe.rounds):
        g_ex = [general[rng.randrange(len(general))] for _ in range(recipe.rollout_batch_size)]
        t_ex = [target[rng.randrange(len(target))] for _ in range(recipe.target_rollouts)]
        gb, gstats = ppo_rollouts(model, ref, reward_fn, tokenizer, g_ex, recipe, kl_ctl.value, gen, False)
        tb, tstats = ppo_rollouts(model, ref, reward_fn, tokenizer, t_ex, recipe, kl_ctl.value, gen, True)
        keep = torch.arange(len(g_ex))
        if iif is not None:
            keep = iif_keep(iif, trim(gb), trim(tb), loss_fn)
            opt.zero_grad(set_to_none=True)
        kept_frac = len(keep) / len(g_ex)
        steps = 0
        for _ in range(recipe.ppo_epochs):
            order = keep[torch.randperm(len(keep), generator=gen)]
            for s in range(0, len(order), recipe.mini_batch_size):
                mb = trim(take(gb, order[s:s + recipe.mini_batch_size]))
                tidx = torch.randperm(len(t_ex), generator=gen)[:recipe.target_batch_size]
                report = reg.step(general=mb, target=trim(take(tb, tidx)), loss_fn=loss_fn)
                if report.skipped:
                    metrics["skipped_steps"] += 1
                    opt.zero_grad(set_to_none=True)
                    continue
                n_tok = float(response_mask(mb["labels"]).sum())
                for p in vparams:  # autograd summed the value loss over rows: make it the token mean
                    if p.grad is not None:
                        p.grad.div_(max(n_tok, 1.0))
                if recipe.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
                    torch.nn.utils.clip_grad_norm_(vparams, recipe.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
        kl_ctl.update(gstats["kl"], recipe.rollout_batch_size)
        metrics["rounds"].append({"round": rnd + 1, "general_score": gstats["score"], "target_score": tstats["score"],
                                  "kl": gstats["kl"], "target_kl": tstats["kl"], "kl_coef": kl_ctl.value,
                                  "kept_frac": kept_frac, "steps": steps, **{k: float(v) for k, v in stats.items()}})
        if progress:
            progress(metrics["rounds"][-1])
        if eval_fn is not None and recipe.eval_every and (rnd + 1) % recipe.eval_every == 0 and rnd + 1 < recipe.rounds:
            metrics["evals"].append({"round": rnd + 1, **eval_fn(policy, rnd + 1)})
    metrics["train_seconds"] = time.perf_counter() - t0
    policy.eval()
    if eval_fn is not None:
        metrics["evals"].append({"round": recipe.rounds, **eval_fn(policy, recipe.rounds)})
    metrics["model"] = policy
    metrics["value_head"] = model.value_head
    return metrics


def rm_reward_fn(rm):
    """reward_fn from a ``drpost.trainers.reward_model.RewardModel``."""

    def fn(prompts, responses, examples):
        return rm.score(prompts, responses)

    return fn


# --------------------------------------------------------------------------- CLI
def run(config) -> int:
    """``drpost rlhf``: PPO on the world's ``rlhf_format`` setting (or given model / reward model / prompts)."""
    import json

    from drpost.trainers import setup
    from drpost.trainers.reward_model import RewardModel, load_classifier, world_reward_model
    from drpost.trainers.rl_common import evaluate_policy, load_prompt_records, start_rl_run

    run_ = start_rl_run(config, "rlhf_format")
    out, device, policy, tok = run_.out, run_.device, run_.policy, run_.tokenizer
    setting, data, general, target = run_.setting, run_.data, run_.general, run_.target
    if config.reward_model:
        from transformers import AutoTokenizer

        rm = RewardModel(load_classifier(config.reward_model).to(device).eval(),
                         AutoTokenizer.from_pretrained(config.reward_model))
        rm_info = {"path": config.reward_model}
    else:
        rm, rm_info = world_reward_model(setting, config.model.size)
        rm.model.to(device)
    ref = copy.deepcopy(policy).eval()
    p = config.ppo
    recipe = RLHFRecipe(rounds=config.steps, rollout_batch_size=p.rollout_batch_size, mini_batch_size=p.mini_batch_size,
                        target_batch_size=config.target_batch_size, target_rollouts=p.target_rollouts,
                        ppo_epochs=p.ppo_epochs, lr=config.optim.lr, value_lr=p.value_lr or config.optim.lr,
                        max_grad_norm=config.optim.max_grad_norm, clip_eps=p.clip_eps, value_clip=p.value_clip,
                        vf_coef=p.vf_coef, kl_coef=p.kl_coef, adaptive_kl=p.adaptive_kl, kl_target=p.kl_target,
                        kl_horizon=p.kl_horizon, gamma=p.gamma, lam=p.lam, whiten_advantages=p.whiten_advantages,
                        max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p,
                        target_objective=p.target_objective, eval_every=config.eval_every, seed=config.seed)
    rc = config.regularizer
    spec = RLMethod(rc.method, rc.method, setup.regularizer_options(rc),
                    baseline=None if p.baseline == "none" else p.baseline)
    test = data.target_test[:100] if config.data.eval is None else load_prompt_records(config.data.eval, None)
    reward_fn = rm_reward_fn(rm)

    def eval_fn(model, rnd):
        return evaluate_policy(model, ref, tok, test, reward_fn, max_new_tokens=p.max_new_tokens,
                               retention=data.retention if config.data.general is None else None)

    def progress(r):
        setup.log.info("round %d: general score %.3f target score %.3f kl %.3f", r["round"], r["general_score"],
                       r["target_score"], r["kl"])

    metrics = train_rlhf(policy, ref, reward_fn, tok, general, target, spec, recipe, eval_fn, progress)
    metrics.pop("model")
    metrics.pop("value_head")
    metrics["reward_model"] = {k: v for k, v in rm_info.items() if k != "loss_curve"}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    return 0
