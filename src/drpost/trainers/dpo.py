"""DPO with data regularization: per-pair DPO loss against a frozen reference; one sample = one pair.

    from drpost.trainers.dpo import DPORecipe, train_dpo
    from drpost.trainers.rlhf import RLMethod
    metrics = train_dpo(policy, ref, tokenizer, general_pairs, target_pairs,
                        RLMethod("Hull", "hull"), DPORecipe(steps=150))

CLI: ``drpost dpo output_dir=runs/dpo regularizer.method=hull steps=150`` (``run(config)``).

Each step draws ``general_batch_size`` general pairs and ``target_batch_size`` target pairs; rows alternate
chosen/rejected (rows 2j, 2j+1 = pair j, ``sample_index`` maps both to sample j) as
``drpost.objectives.dpo.DPOLoss`` expects; reference log-prob sums are computed once per pair and cached.
``DataRegularizer.step`` fills ``.grad``; AdamW with linear warm-up/decay follows. Methods: ``full_training``,
``target_only``, ``global_subset``, ``layerwise_subset`` and the convex sets (``hull``, ...).

Departures from textbook DPO (Rafailov et al. 2023):
1. Pairs are encoded as prompt + answer + EOS (the world's completion form); the loss covers the answer and EOS.
2. The loss returns per-pair values on the chosen row (count 1) and 0 on the rejected row, so the regularizer's
   normalization is the mean over kept pairs.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass

import torch

from drpost.data.collate import collate, tokenize_prompt_completion
from drpost.objectives.dpo import dpo_loss_fn
from drpost.objectives.logprobs import sequence_logps
from drpost.step import DataRegularizer
from drpost.trainers.rlhf import RLMethod


@dataclass
class DPORecipe:
    steps: int = 150
    general_batch_size: int = 8  # pairs
    target_batch_size: int = 2  # pairs
    lr: float = 3e-4
    beta: float = 0.1
    label_smoothing: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float | None = 1.0
    max_length: int = 96
    eval_every: int = 0
    seed: int = 0


def encode_pair(tokenizer, pair: dict, max_length: int) -> tuple[dict, dict]:
    """(chosen row, rejected row) as completion-only rows."""
    return (tokenize_prompt_completion(tokenizer, pair["prompt"], pair["chosen"], max_length),
            tokenize_prompt_completion(tokenizer, pair["prompt"], pair["rejected"], max_length))


class PairBank:
    """Encoded pairs plus their cached reference log-prob sums; ``batch(idx)`` -> an alternating DPO batch."""

    def __init__(self, tokenizer, pairs: list[dict], ref, max_length: int):
        self.rows = [encode_pair(tokenizer, p, max_length) for p in pairs]
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
            lp = sequence_logps(self.ref, mb).view(-1, 2)  # (P, 2)
            for i, (c, r) in zip(missing, lp.tolist()):
                self.ref_logps[i] = (c, r)
        b["ref_logps"] = torch.tensor([v for i in idx for v in self.ref_logps[i]])  # (2P,)
        return b


def train_dpo(policy, ref, tokenizer, general: list[dict], target: list[dict], spec: RLMethod, recipe: DPORecipe,
              eval_fn=None) -> dict:
    """Train ``policy`` in place with regularized DPO; returns metrics (the trained policy under "model")."""
    from drpost.trainers.sft import linear_schedule

    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    policy.train()
    gbank = PairBank(tokenizer, general, ref, recipe.max_length)
    tbank = PairBank(tokenizer, target, ref, recipe.max_length)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    sched = linear_schedule(opt, recipe.steps, recipe.warmup_ratio)
    reg = DataRegularizer(policy, method=spec.method, optimizer=opt, **spec.options)
    stats: dict = {}
    loss_fn = dpo_loss_fn(recipe.beta, recipe.label_smoothing, stats=stats)
    metrics: dict = {"train_loss": [], "target_loss": [], "flipped_weight": [], "evals": [], "skipped_steps": 0,
                     "recipe": asdict(recipe), "method": asdict(spec)}
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        gi = [rng.randrange(len(gbank)) for _ in range(recipe.general_batch_size)]
        ti = [rng.randrange(len(tbank)) for _ in range(recipe.target_batch_size)]
        report = reg.step(general=gbank.batch(gi), target=tbank.batch(ti), loss_fn=loss_fn)
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
        if report.weights is not None:  # share of the update's weight on flipped (noisy) general pairs
            w = report.weights.clamp_min(0).mean(0)  # (n,)
            flipped = torch.tensor([float(general[i].get("flipped", False)) for i in gi])
            if float(w.sum()) > 0:
                metrics["flipped_weight"].append(float((w * flipped).sum() / w.sum()))
        if eval_fn is not None and recipe.eval_every and (step + 1) % recipe.eval_every == 0 and step + 1 < recipe.steps:
            metrics["evals"].append({"step": step + 1, **eval_fn(policy, step + 1)})
    metrics["train_seconds"] = time.perf_counter() - t0
    policy.eval()
    if eval_fn is not None:
        metrics["evals"].append({"step": recipe.steps, **eval_fn(policy, recipe.steps)})
    metrics["model"] = policy
    return metrics


@torch.no_grad()
def pair_accuracy(policy, ref, tokenizer, pairs: list[dict], max_length: int = 96) -> float:
    """Fraction of pairs whose implicit reward margin (pi - ref on chosen minus on rejected) is positive."""
    if not pairs:
        return float("nan")
    bank = PairBank(tokenizer, pairs, ref, max_length)
    b = bank.batch(list(range(len(pairs))))
    h = (sequence_logps(policy, b) - b["ref_logps"]).view(-1, 2)  # (P, 2)
    return float((h[:, 0] > h[:, 1]).float().mean())


def evaluate_dpo(policy, ref, tokenizer, test: list[dict], retention: dict | None, max_new_tokens: int = 8) -> dict:
    """Target exact match (greedy), KL to the reference (samples), retention; plus pair accuracy on test pairs."""
    from drpost.trainers.rl_common import evaluate_policy, verifier_reward_fn

    out = evaluate_policy(policy, ref, tokenizer, test, verifier_reward_fn(tokenizer), max_new_tokens, retention)
    out["pair_accuracy"] = pair_accuracy(policy, ref, tokenizer, test)
    return out


def load_pairs(path: str | None, max_n: int | None) -> list[dict] | None:
    """Preference records ``{"prompt", "chosen", "rejected"}`` from a .jsonl / .json file (None: use the world)."""
    from drpost.data.formats import DataError
    from drpost.trainers.rl_common import load_prompt_records

    recs = load_prompt_records(path, max_n)
    if recs is None:
        return None
    for i, r in enumerate(recs):
        if not isinstance(r.get("chosen"), str) or not isinstance(r.get("rejected"), str):
            raise DataError(f"{path}:{i + 1}: a preference record needs string 'chosen' and 'rejected'")
    return recs


def run(config) -> int:
    """``drpost dpo``: regularized DPO on the world's ``dpo_pairs`` setting (or given model / pair files)."""
    import json

    from drpost.trainers import setup
    from drpost.trainers.rl_common import start_rl_run

    run_ = start_rl_run(config, "dpo_pairs", load=load_pairs)
    out, device, policy, tok = run_.out, run_.device, run_.policy, run_.tokenizer
    data, general, target = run_.data, run_.general, run_.target
    if config.dpo.loss_type != "sigmoid":
        from drpost.config import ConfigError

        raise ConfigError(f"option 'dpo.loss_type': only 'sigmoid' is implemented, got {config.dpo.loss_type!r}")
    if config.dpo.reference:
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(config.dpo.reference).to(device).eval()
    else:
        ref = copy.deepcopy(policy).eval()
    recipe = DPORecipe(steps=config.steps, general_batch_size=config.general_batch_size,
                       target_batch_size=config.target_batch_size, lr=config.optim.lr, beta=config.dpo.beta,
                       label_smoothing=config.dpo.label_smoothing, warmup_ratio=config.optim.warmup_ratio,
                       max_grad_norm=config.optim.max_grad_norm, max_length=config.data.max_seq_length,
                       eval_every=config.eval_every, seed=config.seed)
    rc = config.regularizer
    spec = RLMethod(rc.method, rc.method, setup.regularizer_options(rc))
    test = data.target_test[:100] if config.data.eval is None else load_pairs(config.data.eval, None)
    world = config.data.general is None

    def eval_fn(model, step):
        if world:
            return evaluate_dpo(model, ref, tok, test, data.retention)
        return {"pair_accuracy": pair_accuracy(model, ref, tok, test, recipe.max_length)}

    metrics = train_dpo(policy, ref, tok, general, target, spec, recipe, eval_fn)
    metrics.pop("model")
    setup.log.info("drpost dpo: final %s", {k: v for k, v in metrics["evals"][-1].items()
                                            if not isinstance(v, dict)})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    return 0
