"""RLVR with data regularization: GRPO with verifiable rewards, curated by a target direction.

    from drpost.trainers.rlvr import RLVRRecipe, train_rlvr
    from drpost.trainers.rlhf import RLMethod
    metrics = train_rlvr(policy, ref, reward_fn, tokenizer, general_prompts, target_prompts,
                         RLMethod("LayerWiseSubset", "layerwise_subset", {"selection": "filter", "frac": 1.0}),
                         RLVRRecipe(steps=40))

CLI: ``drpost rlvr output_dir=runs/rlvr regularizer.method=layerwise_subset steps=40`` (``run(config, sources)``,
which the command line calls with the world's sources from ``drpost.world.runs``; the shared CLI run of
``drpost.trainers.runner``: LoRA / MeSO, ``optim.*``, checkpoints, resume, the model in ``final/``).
Rewards: the records' own check (``Sources.record_check``: the world task's verifier for world records), else
``grpo.verifier`` (``drpost.data.verifiers``) on the record's ``answer``.

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
from dataclasses import asdict, dataclass

import torch

from drpost.objectives.advantages import group_advantages
from drpost.objectives.grpo import group_sample_index
from drpost.objectives.logprobs import response_mask
from drpost.objectives.rl_target import normalize_rewards
from drpost.step import DataRegularizer
from drpost.trainers.loop import (
    Task,
    TrainState,
    apply_update,
    constant_schedule,
    freeze,
    kept_fraction,
    run_eval,
    train,
)
from drpost.trainers.rl_common import (
    MixedRLLoss,
    encode_prompt,
    forward_stats,
    rollout_batch,
    sample_generate,
    trim,
    truncate_prompt,
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
    max_prompt_length: int | None = None  # keep the prompt's last N tokens; None = whole prompts
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
    bos = getattr(tokenizer, "bos_token_id", None)
    prompts = [truncate_prompt(encode_prompt(tokenizer, e["prompt"]), recipe.max_prompt_length, bos) for e in reps]
    responses = sample_generate(policy, tokenizer, prompts, recipe.max_new_tokens, recipe.temperature,
                                generator=generator)
    batch = rollout_batch(prompts, responses, tokenizer.pad_token_id)
    old, _ = forward_stats(policy, batch)  # (R, T)
    refl = forward_stats(ref, batch)[0] if recipe.kl_coef else torch.zeros_like(old)
    rewards = reward_fn(prompts, responses, reps).cpu().to(old.dtype)  # (R,)
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


class RLVRTask(Task):
    """GRPO steps: rollouts of general and target prompts, then ``num_iterations`` regularized updates. The prompt
    RNG and the sampling generator are its running state."""

    command = "rlvr"

    def __init__(self, policy, ref, reward_fn, tokenizer, general: list[dict], target: list[dict], spec: RLMethod,
                 recipe: RLVRRecipe, opt=None, sched=None, reg=None):
        if spec.baseline is not None:
            raise ValueError(f"RLVR has no baseline {spec.baseline!r} (IIF is an RLHF baseline)")
        self.model, self.ref, self.reward_fn, self.tokenizer = policy, freeze(ref), reward_fn, tokenizer
        self.general, self.target, self.spec, self.recipe = general, target, spec, recipe
        self.rng = random.Random(recipe.seed)
        self.gen = torch.Generator().manual_seed(recipe.seed)
        policy.train()
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.opt = opt or torch.optim.AdamW(self.params, lr=recipe.lr, weight_decay=0.0)
        self.sched = sched or constant_schedule(self.opt)
        self.reg = reg or DataRegularizer(policy, method=spec.method, optimizer=self.opt, **spec.options)
        self.stats: dict = {}
        self.loss_fn = MixedRLLoss("grpo", recipe.target_objective, recipe.clip_eps, kl_coef=recipe.kl_coef,
                                   stats=self.stats)

    def new_metrics(self) -> dict:
        return {"steps": [], "evals": [], "skipped_steps": 0, "solver_fallbacks": 0, "train_seconds": 0.0,
                "recipe": asdict(self.recipe), "method": asdict(self.spec)}

    def step(self, i: int, metrics: dict) -> dict:
        r, rng = self.recipe, self.rng
        g_ex = [self.general[rng.randrange(len(self.general))] for _ in range(r.prompts_per_step)]
        t_ex = [self.target[rng.randrange(len(self.target))] for _ in range(r.target_prompts)]
        gb, gstats = grpo_rollouts(self.model, self.ref, self.reward_fn, self.tokenizer, g_ex, r, self.gen, False)
        tb, tstats = grpo_rollouts(self.model, self.ref, self.reward_fn, self.tokenizer, t_ex, r, self.gen, True)
        gb, tb = trim(gb), trim(tb)
        kept, skipped = [], None
        for _ in range(r.num_iterations):
            report = self.reg.step(general=gb, target=tb, loss_fn=self.loss_fn)
            if report.skipped:
                skipped = report.skip_reason
            else:
                kept.append(kept_fraction(report))
            apply_update(self, report, self.params, r.max_grad_norm, metrics)
        self.sched.step()
        rec = {"step": i + 1, "general_reward": gstats["reward"], "target_reward": tstats["reward"],
               "solved_groups": gstats["solved_groups"], "kept_frac": sum(kept) / len(kept) if kept else None,
               **{k: float(v) for k, v in self.stats.items()}}
        metrics["steps"].append(rec)
        return {k: v for k, v in rec.items() if k != "step" and v is not None} | {"skipped": skipped}

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        from drpost.trainers.checkpoint import _tuples

        self.rng.setstate(_tuples(state["rng"]))
        self.gen.set_state(state["generator"])


def train_rlvr(policy, ref, reward_fn, tokenizer, general: list[dict], target: list[dict], spec: RLMethod,
               recipe: RLVRRecipe, eval_fn=None, progress=None) -> dict:
    """Train ``policy`` (a causal LM, in place) with GRPO; returns metrics (the trained policy under "model").

    reward_fn(prompt_ids, response_ids, examples) -> (R,) rewards. ``ref`` is frozen (KL penalty and evaluation).
    ``progress(record)`` is called after every step with its record.
    """
    torch.manual_seed(recipe.seed)
    task = RLVRTask(policy, ref, reward_fn, tokenizer, general, target, spec, recipe)
    state = TrainState(0, task.new_metrics())
    hooks = [lambda st, _logs: progress(st.metrics["steps"][-1])] if progress else []
    train(task, state, recipe.steps, eval_fn=eval_fn, eval_every=recipe.eval_every, hooks=hooks)
    run_eval(task, eval_fn, state, recipe.steps)
    state.metrics["model"] = policy
    return state.metrics


# ---------------------------------------------------------------------------------------------------- the CLI run
def build(config, device, sources=None):
    """The GRPO task of a ``drpost rlvr`` config (everything checked before anything is written), its evaluation;
    the policy, prompts and the records' own check (``grpo.verifier=world``) come through ``sources``
    (``drpost.trainers.sources.Sources``; default: files and the ``drpost.data.verifiers`` checks only)."""
    from drpost.data.formats import DataError
    from drpost.data.verifiers import check_numeric_answers
    from drpost.trainers import setup
    from drpost.trainers.loop import make_scheduler, recipe_from
    from drpost.trainers.rl_common import (
        answer_reward_fn,
        check_reward_fn,
        evaluate_policy,
        prompt_budget,
        refuse_unused,
    )
    from drpost.trainers.sources import Sources

    sources = sources or Sources()
    g = config.grpo
    refuse_unused(config, {"general_batch_size": "the general batch is grpo.prompts_per_step prompts x "
                                                 "grpo.group_size completions",
                           "data.overlong": "prompts are cut to data.max_seq_length - grpo.max_new_tokens tokens"})
    max_prompt = prompt_budget(config, g.max_new_tokens, "grpo.max_new_tokens")
    policy, tok = sources.load_model(config.model, device)
    data = sources.rl_data(config, "rlvr", tok)
    own_check = sources.record_check(data.general + data.target + data.test)  # the world's, on world records
    kind = g.verifier
    if kind == "auto":
        kind = "world" if own_check is not None else "exact"
    if kind == "world":
        if own_check is None:
            raise DataError("grpo.verifier=world needs records with the world task's 'family' and 'answer'; use "
                            "grpo.verifier=exact|numeric|contains for your own prompts with an 'answer'")
        reward_fn = check_reward_fn(tok, own_check)
    else:
        if kind == "numeric":
            for name, recs in (("data.general", data.general), ("data.target", data.target)):
                check_numeric_answers(recs, getattr(config.data, name.split(".")[1]))
        reward_fn = answer_reward_fn(tok, kind)
    ref = copy.deepcopy(policy)  # the initial model, before adapters
    policy = setup.apply_finetuning(policy, config.model)
    recipe = recipe_from(RLVRRecipe, g, steps=config.steps, target_prompts=config.target_batch_size,
                         lr=config.optim.lr, max_grad_norm=config.optim.max_grad_norm, max_prompt_length=max_prompt,
                         eval_every=config.eval_every, seed=config.seed)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = setup.make_optimizer(params, config)
    sched = make_scheduler(opt, config.optim.schedule, config.steps, config.optim.warmup_ratio)
    spec = RLMethod(config.regularizer.method, config.regularizer.method)
    task = RLVRTask(policy, ref, reward_fn, tok, data.general, data.target, spec, recipe, opt=opt, sched=sched,
                    reg=setup.make_regularizer(policy, config, opt))

    check = sources.record_check(data.test)

    def eval_fn(model, step):
        return evaluate_policy(model, task.ref, tok, data.test, reward_fn, max_new_tokens=g.max_new_tokens,
                               retention=data.retention, check=check)

    return task, (eval_fn if data.test else None)


def run(config, sources=None) -> int:
    """``drpost rlvr``: GRPO on given prompt files, or on a built-in setting of ``sources`` (the CLI's: the world's
    ``rlvr_arith``; see the module doc)."""
    from drpost.trainers.runner import run_task

    return run_task(config, build, sources)
