"""DPO with data regularization: per-pair DPO loss against a frozen reference; one sample = one pair.

    from drpost.trainers.dpo import DPORecipe, train_dpo
    from drpost.trainers.rlhf import RLMethod
    metrics = train_dpo(policy, ref, tokenizer, general_pairs, target_pairs,
                        RLMethod("Hull", "hull"), DPORecipe(steps=150))

CLI: ``drpost dpo output_dir=runs/dpo regularizer.method=hull steps=150`` (``run(config, sources)``, which the
command line calls with the world's sources from ``drpost.world.runs``; the shared CLI run of
``drpost.trainers.runner``: LoRA / MeSO, optimizer and schedule from ``optim.*``, checkpoints, resume, the trained
model in ``output_dir/final``).

Each step (``DPOTask.step``) draws ``general_batch_size`` general pairs and ``target_batch_size`` target pairs; rows
alternate chosen/rejected (rows 2j, 2j+1 = pair j, ``sample_index`` maps both to sample j) as
``drpost.objectives.dpo.DPOLoss`` expects; reference log-prob sums are computed once per pair and cached (the cache
is part of a checkpoint, so a resumed run sees the same values). ``DataRegularizer.step`` fills ``.grad``; the
optimizer and the schedule follow. ``dpo.loss_type``: ``sigmoid`` (DPO), ``ipo`` (``(h - 1/(2 beta))^2``, Azar et
al. 2023) or ``hinge`` (``max(0, 1 - beta h)``, SLiC), with ``h`` the pair's log-ratio margin.

Departures from textbook DPO (Rafailov et al. 2023):
1. Pairs are encoded as prompt + answer + EOS (the world's completion form); the loss covers the answer and EOS.
2. The loss returns per-pair values on the chosen row (count 1) and 0 on the rejected row, so the regularizer's
   normalization is the mean over kept pairs.
"""

from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass

import torch

from drpost.data.collate import collate
from drpost.data.prompts import encode_preference
from drpost.objectives.dpo import DPOLoss, dpo_loss_fn
from drpost.objectives.logprobs import sequence_logps, token_logps
from drpost.step import DataRegularizer
from drpost.trainers.loop import (
    Task,
    TrainState,
    apply_update,
    freeze,
    kept_fraction,
    run_eval,
    train,
    warmup_linear,
)
from drpost.trainers.rlhf import RLMethod


@dataclass
class DPORecipe:
    steps: int = 150
    general_batch_size: int = 8  # pairs
    target_batch_size: int = 2  # pairs
    lr: float = 3e-4
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge
    warmup_ratio: float = 0.03
    max_grad_norm: float | None = 1.0
    max_length: int = 96
    max_prompt_length: int | None = None  # keep the prompt's last N tokens; None = only max_length applies
    eval_every: int = 0
    seed: int = 0


class PairLoss(DPOLoss):
    """DPO's row contract with the IPO or hinge pair loss on the margin ``h = (pi_c - ref_c) - (pi_r - ref_r)``."""

    def __init__(self, loss_type: str, beta: float, stats: dict | None = None):
        super().__init__(beta=beta, stats=stats)
        self.loss_type = loss_type

    def __call__(self, model, batch: dict):
        logp, _ = token_logps(model, batch)  # (R, T)
        ratios = (logp.sum(-1) - batch["ref_logps"].to(logp.dtype)).view(-1, 2)  # (P, 2): chosen, rejected
        h = ratios[:, 0] - ratios[:, 1]  # (P,)
        if self.loss_type == "ipo":
            loss = (h - 1.0 / (2.0 * self.beta)) ** 2
        else:  # hinge
            loss = torch.relu(1.0 - self.beta * h)
        rows = torch.stack([loss, torch.zeros_like(loss)], dim=1).reshape(-1)  # (R,)
        counts = torch.stack([torch.ones_like(loss), torch.zeros_like(loss)], dim=1).reshape(-1).detach()
        r = (self.beta * ratios).detach()
        self.stats.clear()
        self.stats.update(chosen_rewards=r[:, 0], rejected_rewards=r[:, 1], margins=r[:, 0] - r[:, 1],
                          accuracies=(r[:, 0] > r[:, 1]).to(r.dtype))
        return rows, counts


def pair_loss_fn(loss_type: str, beta: float, label_smoothing: float = 0.0, stats: dict | None = None):
    if loss_type == "sigmoid":
        return dpo_loss_fn(beta, label_smoothing, stats=stats)
    if loss_type not in ("ipo", "hinge"):
        raise ValueError(f"option 'loss_type': expected sigmoid, ipo or hinge, got {loss_type!r}")
    if label_smoothing:
        raise ValueError(f"option 'label_smoothing' applies to the sigmoid loss only, not {loss_type}")
    return PairLoss(loss_type, beta, stats)


class PairBank:
    """Encoded pairs plus their cached reference log-prob sums; ``batch(idx)`` -> an alternating DPO batch."""

    def __init__(self, tokenizer, pairs: list[dict], ref, max_length: int, max_prompt_length: int | None = None):
        self.rows = [encode_preference(tokenizer, p, max_length, max_prompt_length) for p in pairs]
        self.ref = ref
        self.pad = tokenizer.pad_token_id
        self.ref_logps: dict[int, tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx: list[int]) -> dict:
        rows = [r for i in idx for r in self.rows[i]]  # chosen, rejected, chosen, rejected, ...
        b = collate(rows, self.pad, sample_index=[j for j in range(len(idx)) for _ in (0, 1)])
        missing = [i for i in dict.fromkeys(idx) if i not in self.ref_logps]
        if missing:
            mb = collate([r for i in missing for r in self.rows[i]], self.pad)
            dev = next(self.ref.parameters()).device
            lp = sequence_logps(self.ref, {k: v.to(dev) for k, v in mb.items()}).view(-1, 2)  # (P, 2)
            for i, (c, r) in zip(missing, lp.tolist()):
                self.ref_logps[i] = (c, r)
        b["ref_logps"] = torch.tensor([v for i in idx for v in self.ref_logps[i]])  # (2P,)
        return b

    def state(self) -> list:
        return [[i, c, r] for i, (c, r) in self.ref_logps.items()]

    def load(self, state: list) -> None:
        self.ref_logps = {int(i): (float(c), float(r)) for i, c, r in state}


class DPOTask(Task):
    """Regularized DPO steps; the batch RNG and the reference log-prob caches are its running state."""

    command = "dpo"

    def __init__(self, policy, ref, tokenizer, general: list[dict], target: list[dict], spec: RLMethod,
                 recipe: DPORecipe, opt=None, sched=None, reg=None):
        self.model, self.ref, self.tokenizer, self.general, self.spec, self.recipe = \
            policy, freeze(ref), tokenizer, general, spec, recipe
        self.rng = random.Random(recipe.seed)
        policy.train()
        self.gbank = PairBank(tokenizer, general, ref, recipe.max_length, recipe.max_prompt_length)
        self.tbank = PairBank(tokenizer, target, ref, recipe.max_length, recipe.max_prompt_length)
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.opt = opt or torch.optim.AdamW(self.params, lr=recipe.lr, weight_decay=0.0)
        self.sched = sched or warmup_linear(self.opt, recipe.steps, recipe.warmup_ratio)
        self.reg = reg or DataRegularizer(policy, method=spec.method, optimizer=self.opt, **spec.options)
        self.stats: dict = {}
        self.loss_fn = pair_loss_fn(recipe.loss_type, recipe.beta, recipe.label_smoothing, stats=self.stats)

    def new_metrics(self) -> dict:
        return {"train_loss": [], "target_loss": [], "flipped_weight": [], "kept_frac": [], "evals": [],
                "skipped_steps": 0, "solver_fallbacks": 0, "train_seconds": 0.0, "recipe": asdict(self.recipe),
                "method": asdict(self.spec)}

    def step(self, i: int, metrics: dict) -> dict:
        r = self.recipe
        gi = [self.rng.randrange(len(self.gbank)) for _ in range(r.general_batch_size)]
        ti = [self.rng.randrange(len(self.tbank)) for _ in range(r.target_batch_size)]
        report = self.reg.step(general=self.gbank.batch(gi), target=self.tbank.batch(ti), loss_fn=self.loss_fn)
        logs = {"loss": report.loss, "target_loss": report.target_loss,
                "skipped": report.skip_reason if report.skipped else None}
        if apply_update(self, report, self.params, r.max_grad_norm, metrics):
            metrics["train_loss"].append(report.loss)
            metrics["target_loss"].append(report.target_loss)
            metrics["kept_frac"].append(logs.setdefault("kept_frac", kept_fraction(report)))
            if report.weights is not None:  # share of the update's weight on flipped (noisy) general pairs
                w = report.weights.clamp_min(0).mean(0)  # (n,)
                flipped = torch.tensor([float(self.general[j].get("flipped", False)) for j in gi])
                if float(w.sum()) > 0:
                    metrics["flipped_weight"].append(float((w * flipped).sum() / w.sum()))
        self.sched.step()
        return logs

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "general_ref": self.gbank.state(), "target_ref": self.tbank.state()}

    def load_state_dict(self, state: dict) -> None:
        from drpost.trainers.checkpoint import _tuples

        self.rng.setstate(_tuples(state["rng"]))
        self.gbank.load(state["general_ref"])
        self.tbank.load(state["target_ref"])


def train_dpo(policy, ref, tokenizer, general: list[dict], target: list[dict], spec: RLMethod, recipe: DPORecipe,
              eval_fn=None) -> dict:
    """Train ``policy`` in place with regularized DPO; returns metrics (the trained policy under "model")."""
    torch.manual_seed(recipe.seed)
    task = DPOTask(policy, ref, tokenizer, general, target, spec, recipe)
    state = TrainState(0, task.new_metrics())
    train(task, state, recipe.steps, eval_fn=eval_fn, eval_every=recipe.eval_every)
    run_eval(task, eval_fn, state, recipe.steps)
    state.metrics["model"] = policy
    return state.metrics


@torch.no_grad()
def pair_accuracy(policy, ref, tokenizer, pairs: list[dict], max_length: int = 96) -> float:
    """Fraction of pairs whose implicit reward margin (pi - ref on chosen minus on rejected) is positive."""
    if not pairs:
        return float("nan")
    bank = PairBank(tokenizer, pairs, ref, max_length)
    b = bank.batch(list(range(len(pairs))))
    dev = next(policy.parameters()).device
    h = (sequence_logps(policy, {k: v.to(dev) for k, v in b.items()}).cpu() - b["ref_logps"]).view(-1, 2)  # (P, 2)
    return float((h[:, 0] > h[:, 1]).float().mean())


def evaluate_dpo(policy, ref, tokenizer, test: list[dict], check, retention=None, max_new_tokens: int = 8) -> dict:
    """Target exact match of greedy (``em``) and sampled (``sampled_em``) answers under ``check(text, pair)``, KL to
    the reference (k3 on samples), ``retention(policy)``; plus pair accuracy on the test pairs."""
    from drpost.trainers.rl_common import check_reward_fn, evaluate_policy

    out = evaluate_policy(policy, ref, tokenizer, test, check_reward_fn(tokenizer, check), max_new_tokens, retention,
                          check=check)
    out.pop("reward", None)  # the verifier's reward of greedy answers is exactly em
    out["sampled_em"] = out.pop("sampled_reward")
    out["pair_accuracy"] = pair_accuracy(policy, ref, tokenizer, test)
    return out


# ---------------------------------------------------------------------------------------------------- the CLI run
def build(config, device, sources=None):
    """The DPO task of a ``drpost dpo`` config (everything checked before anything is written) and its evaluation;
    models and pairs come through ``sources`` (``drpost.trainers.sources.Sources``; default: files only)."""
    from drpost.config import ConfigError
    from drpost.trainers import setup
    from drpost.trainers.loop import make_scheduler, recipe_from
    from drpost.trainers.rl_common import refuse_unused
    from drpost.trainers.sources import Sources

    sources = sources or Sources()
    c = config.dpo
    refuse_unused(config, {"data.overlong": "a pair that does not fit data.max_seq_length is an error naming it; "
                                            "dpo.max_prompt_length cuts prompts from the left"})
    if c.label_smoothing and c.loss_type != "sigmoid":
        raise ConfigError(f"option 'dpo.label_smoothing' applies to dpo.loss_type=sigmoid only, not {c.loss_type}")
    policy, tok = sources.load_model(config.model, device)
    data = sources.rl_data(config, "dpo", tok)
    if c.reference:
        try:
            ref, _ = sources.load_model(type(config.model)(name_or_path=c.reference, dtype=config.model.dtype),
                                        device)
        except ConfigError as e:
            raise ConfigError(str(e).replace("option 'model.name_or_path'", "option 'dpo.reference'")) from None
    else:
        ref = copy.deepcopy(policy)  # the initial model, before adapters
    policy = setup.apply_finetuning(policy, config.model)
    recipe = recipe_from(DPORecipe, config, c, lr=config.optim.lr, warmup_ratio=config.optim.warmup_ratio,
                         max_grad_norm=config.optim.max_grad_norm, max_length=config.data.max_seq_length)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = setup.make_optimizer(params, config)
    sched = make_scheduler(opt, config.optim.schedule, config.steps, config.optim.warmup_ratio)
    spec = RLMethod(config.regularizer.method, config.regularizer.method)
    task = DPOTask(policy, ref, tok, data.general, data.target, spec, recipe, opt=opt, sched=sched,
                   reg=setup.make_regularizer(policy, config, opt))
    test = data.test
    check = sources.record_check(test) if data.setting is not None and config.data.eval is None else None

    def eval_fn(model, step):
        if check is not None:
            return evaluate_dpo(model, task.ref, tok, test, check, data.retention)
        return {"pair_accuracy": pair_accuracy(model, task.ref, tok, test, recipe.max_length)}

    return task, (eval_fn if test else None)


def run(config, sources=None) -> int:
    """``drpost dpo``: regularized DPO on given pairs, or on a built-in setting of ``sources`` (the CLI's: the
    world's ``dpo_pairs``; see the module doc)."""
    from drpost.trainers.runner import run_task

    return run_task(config, build, sources)
