"""RLHF with data regularization: PPO (value head, GAE, KL penalty to a frozen reference) on a learned reward.

    from drpost.trainers.rlhf import RLHFRecipe, RLMethod, train_rlhf
    metrics = train_rlhf(policy, ref, reward_model, tokenizer, general_prompts, target_prompts,
                         RLMethod("LayerWiseSubset", "layerwise_subset", {"frac": 0.5}), RLHFRecipe(rounds=20))

CLI: ``drpost rlhf output_dir=runs/rlhf regularizer.method=layerwise_subset steps=20`` (``run(config, sources)``,
which the command line calls with the world's sources from ``drpost.world.runs``; the shared CLI run of
``drpost.trainers.runner``: LoRA / MeSO, ``optim.*`` (the schedule advances once per round), checkpoints, resume,
the policy in ``final/`` and the value head in ``final/value_head.safetensors``).

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
4. The library recipe keeps a constant learning rate (the CLI follows ``optim.schedule`` per round); gradient
   clipping after the regularizer wrote ``.grad``.

Metrics per round: ``kept_frac`` is the fraction of the regularizer's sample weights that are nonzero, averaged over
the round's steps (times the share IIF kept); ``iif_kept_frac`` the share IIF kept.
"""

from __future__ import annotations

import copy
import random
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
from drpost.trainers.loop import Task, TrainState, constant_schedule, freeze, kept_fraction, run_eval, train
from drpost.trainers.rl_common import (
    MixedRLLoss,
    encode_prompt,
    forward_stats,
    rollout_batch,
    sample_generate,
    take,
    trim,
    truncate_prompt,
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
    max_prompt_length: int | None = None  # keep the prompt's last N tokens; None = whole prompts
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
    bos = getattr(tokenizer, "bos_token_id", None)
    prompts = [truncate_prompt(encode_prompt(tokenizer, e["prompt"]), recipe.max_prompt_length, bos)
               for e in examples]
    responses = sample_generate(model.policy, tokenizer, prompts, recipe.max_new_tokens, recipe.temperature,
                                recipe.top_p, generator)
    batch = rollout_batch(prompts, responses, tokenizer.pad_token_id)
    logps, values = forward_stats(model, batch)  # (R, T) each
    ref_logps, _ = forward_stats(ref, batch)
    scores = reward_fn(prompts, responses, examples).cpu().to(logps.dtype)  # (R,)
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
class RLHFTask(Task):
    """PPO rounds (one loop step = one round). The prompt RNG, the sampling generator and the KL controller are its
    running state; the value head is trained (and checkpointed) with the policy."""

    command = "rlhf"
    unit = "round"

    def __init__(self, policy, ref, reward_fn, tokenizer, general: list[dict], target: list[dict], spec: RLMethod,
                 recipe: RLHFRecipe, make_opt=None, make_sched=None, make_reg=None):
        self.model, self.ref, self.reward_fn, self.tokenizer = policy, ref, reward_fn, tokenizer
        self.general, self.target, self.spec, self.recipe = general, target, spec, recipe
        self.extra_metrics: dict = {}
        self.rng = random.Random(recipe.seed)
        self.gen = torch.Generator().manual_seed(recipe.seed)
        self.wrapped = DetachedValuePolicy(policy)
        self.wrapped.value_head.to(next(policy.parameters()).device)
        freeze(ref)
        policy.train()
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.vparams = list(self.wrapped.value_head.parameters())
        groups = [{"params": self.params, "lr": recipe.lr}, {"params": self.vparams, "lr": recipe.value_lr}]
        self.opt = make_opt(groups) if make_opt else torch.optim.AdamW(groups, weight_decay=0.0)
        self.sched = make_sched(self.opt) if make_sched else constant_schedule(self.opt)
        method = "full_training" if spec.baseline == "iif" else spec.method
        self.reg = make_reg(self.opt) if make_reg else DataRegularizer(
            policy, method=method, optimizer=self.opt, **(spec.options if spec.baseline is None else {}))
        self.iif = DataRegularizer(policy, method="global_subset", selection="filter", frac=1.0) \
            if spec.baseline == "iif" else None
        self.stats: dict = {}
        self.mixed = MixedRLLoss("ppo", recipe.target_objective, recipe.clip_eps, recipe.value_clip, recipe.vf_coef,
                                 stats=self.stats)
        self.kl_ctl = (AdaptiveKLController(recipe.kl_coef, recipe.kl_target, recipe.kl_horizon)
                       if recipe.adaptive_kl else FixedKLController(recipe.kl_coef))

    def loss_fn(self, _lm, batch):  # the regularizer passes the LM; the loss needs the value head too
        return self.mixed(self.wrapped, batch)

    def new_metrics(self) -> dict:
        return {"rounds": [], "evals": [], "skipped_steps": 0, "solver_fallbacks": 0, "train_seconds": 0.0,
                "recipe": asdict(self.recipe), "method": asdict(self.spec), **self.extra_metrics}

    def modules(self) -> dict:
        return {"": self.model, "value_head.": self.wrapped.value_head}

    def step(self, i: int, metrics: dict) -> dict:
        r, rng, gen, opt = self.recipe, self.rng, self.gen, self.opt
        g_ex = [self.general[rng.randrange(len(self.general))] for _ in range(r.rollout_batch_size)]
        t_ex = [self.target[rng.randrange(len(self.target))] for _ in range(r.target_rollouts)]
        kl = self.kl_ctl.value
        gb, gstats = ppo_rollouts(self.wrapped, self.ref, self.reward_fn, self.tokenizer, g_ex, r, kl, gen, False)
        tb, tstats = ppo_rollouts(self.wrapped, self.ref, self.reward_fn, self.tokenizer, t_ex, r, kl, gen, True)
        keep = torch.arange(len(g_ex))
        if self.iif is not None:
            keep = iif_keep(self.iif, trim(gb), trim(tb), self.loss_fn)
            opt.zero_grad(set_to_none=True)
        iif_frac = len(keep) / len(g_ex)
        steps, kept, skipped = 0, [], None
        for _ in range(r.ppo_epochs):
            order = keep[torch.randperm(len(keep), generator=gen)]
            for s in range(0, len(order), r.mini_batch_size):
                mb = trim(take(gb, order[s:s + r.mini_batch_size]))
                tidx = torch.randperm(len(t_ex), generator=gen)[:r.target_batch_size]
                report = self.reg.step(general=mb, target=trim(take(tb, tidx)), loss_fn=self.loss_fn)
                if report.info.get("solver_fallback"):
                    metrics["solver_fallbacks"] = metrics.get("solver_fallbacks", 0) + 1
                if report.skipped:
                    metrics["skipped_steps"] += 1
                    skipped = report.skip_reason
                    opt.zero_grad(set_to_none=True)
                    continue
                kept.append(kept_fraction(report))
                n_tok = float(response_mask(mb["labels"]).sum())
                for p in self.vparams:  # autograd summed the value loss over rows: make it the token mean
                    if p.grad is not None:
                        p.grad.div_(max(n_tok, 1.0))
                if r.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.params, r.max_grad_norm)
                    torch.nn.utils.clip_grad_norm_(self.vparams, r.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
        self.sched.step()
        self.kl_ctl.update(gstats["kl"], r.rollout_batch_size)
        rec = {"round": i + 1, "general_score": gstats["score"], "target_score": tstats["score"], "kl": gstats["kl"],
               "target_kl": tstats["kl"], "kl_coef": self.kl_ctl.value,
               "kept_frac": iif_frac * (sum(kept) / len(kept) if kept else 0.0), "iif_kept_frac": iif_frac,
               "steps": steps, **{k: float(v) for k, v in self.stats.items()}}
        metrics["rounds"].append(rec)
        return {k: v for k, v in rec.items() if k not in ("round", "steps")} | {"skipped": skipped}

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "generator": self.gen.get_state(), "kl_ctl": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        from drpost.trainers.checkpoint import _tuples

        self.rng.setstate(_tuples(state["rng"]))
        self.gen.set_state(state["generator"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])

    def save_extra(self, final_dir) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in self.wrapped.value_head.state_dict().items()},
                  str(final_dir / "value_head.safetensors"))


def train_rlhf(policy, ref, reward_fn, tokenizer, general: list[dict], target: list[dict], spec: RLMethod,
               recipe: RLHFRecipe, eval_fn=None, progress=None) -> dict:
    """Train ``policy`` (a causal LM, in place) with PPO; returns metrics (the trained policy under "model").

    reward_fn(prompt_ids, response_ids, examples) -> (R,) scores. ``ref`` is frozen. ``eval_fn(policy, round)`` ->
    dict, called every ``recipe.eval_every`` rounds and at the end; ``progress(record)`` after every round.
    """
    torch.manual_seed(recipe.seed)
    task = RLHFTask(policy, ref, reward_fn, tokenizer, general, target, spec, recipe)
    state = TrainState(0, task.new_metrics())
    hooks = [lambda st, _logs: progress(st.metrics["rounds"][-1])] if progress else []
    train(task, state, recipe.rounds, eval_fn=eval_fn, eval_every=recipe.eval_every, hooks=hooks)
    run_eval(task, eval_fn, state, recipe.rounds)
    state.metrics["model"] = policy
    state.metrics["value_head"] = task.wrapped.value_head
    return state.metrics


def rm_reward_fn(rm):
    """reward_fn from a ``drpost.trainers.reward_model.RewardModel``."""

    def fn(prompts, responses, examples):
        return rm.score(prompts, responses)

    return fn


# --------------------------------------------------------------------------- CLI
def build(config, device, sources=None):
    """The PPO task of a ``drpost rlhf`` config (everything checked before anything is written), its evaluation;
    the policy, prompts and (without ``reward_model``) the reward model come through ``sources``
    (``drpost.trainers.sources.Sources``; default: files only)."""
    from drpost.config import ConfigError
    from drpost.trainers import setup
    from drpost.trainers.loop import make_scheduler, recipe_from
    from drpost.trainers.reward_model import RewardModel, load_classifier
    from drpost.trainers.rl_common import evaluate_policy, prompt_budget, refuse_unused
    from drpost.trainers.sources import Sources

    sources = sources or Sources()
    p = config.ppo
    refuse_unused(config, {"general_batch_size": "the general batch of a step is ppo.mini_batch_size rollout "
                                                 "records, from ppo.rollout_batch_size prompts per round",
                           "data.format": "drpost rlhf reads each record's prompt whatever its shape: prompt, "
                                          "messages, prompt/completion or prompt/answer",
                           "data.overlong": "prompts are cut to data.max_seq_length - ppo.max_new_tokens tokens"})
    max_prompt = prompt_budget(config, p.max_new_tokens, "ppo.max_new_tokens")
    policy, tok = sources.load_model(config.model, device)
    data = sources.rl_data(config, "rlhf", tok)
    if config.reward_model:
        from transformers import AutoTokenizer

        try:
            rm = RewardModel(load_classifier(config.reward_model).to(device).eval(),
                             AutoTokenizer.from_pretrained(config.reward_model))
        except (OSError, ValueError) as e:
            raise ConfigError(f"option 'reward_model': cannot load {config.reward_model!r} as a sequence "
                              f"classifier: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        rm_info = {"path": config.reward_model}
    else:
        found = sources.reward_model(data, config)
        if found is None:
            raise ConfigError("option 'reward_model' is needed with your own prompts (data.general / data.target): "
                              "the world's learned reward model only scores the world's prompts")
        rm, rm_info = found
        rm.model.to(device)
    ref = copy.deepcopy(policy)  # the initial model, before adapters
    policy = setup.apply_finetuning(policy, config.model)
    recipe = recipe_from(RLHFRecipe, p, rounds=config.steps, target_batch_size=config.target_batch_size,
                         lr=config.optim.lr, value_lr=p.value_lr or config.optim.lr,
                         max_grad_norm=config.optim.max_grad_norm, max_prompt_length=max_prompt,
                         eval_every=config.eval_every, seed=config.seed)
    spec = RLMethod(config.regularizer.method, config.regularizer.method,
                    baseline=None if p.baseline == "none" else p.baseline)
    reward_fn = rm_reward_fn(rm)
    task = RLHFTask(policy, ref, reward_fn, tok, data.general, data.target, spec, recipe,
                    make_opt=lambda groups: setup.make_optimizer(groups, config),
                    make_sched=lambda opt: make_scheduler(opt, config.optim.schedule, config.steps,
                                                          config.optim.warmup_ratio),
                    make_reg=lambda opt: setup.make_regularizer(policy, config, opt))  # with iif too (ppo.baseline)
    task.extra_metrics = {"reward_model": {k: v for k, v in rm_info.items() if k != "loss_curve"}}

    check = sources.record_check(data.test)

    def eval_fn(model, rnd):
        return evaluate_policy(model, ref, tok, data.test, reward_fn, max_new_tokens=p.max_new_tokens,
                               retention=data.retention, check=check)

    return task, (eval_fn if data.test else None)


def run(config, sources=None) -> int:
    """``drpost rlhf``: PPO on given prompts with a given reward model, or on a built-in setting of ``sources`` (the
    CLI's: the world's ``rlhf_format`` and its learned reward model; see the module docstring)."""
    from drpost.trainers.runner import run_task

    return run_task(config, build, sources)
