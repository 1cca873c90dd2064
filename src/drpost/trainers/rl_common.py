"""Shared machinery of the RL trainers (RLHF with PPO, RLVR with GRPO): sampling, rollout rows, the mixed loss.

Owns
- ``encode_prompt`` / ``sample_generate`` (a KV-cache sampling loop with temperature and top-p) and
  ``hf_sample_generate`` (the same through ``model.generate``); ``time_rollouts(model, tokenizer, prompts)`` times
  both. Measured (``ROLLOUT_TIMING``; the tiny world model, 64 world prompts x 12 new tokens, 1 thread, shared
  2-core machine, best of 3): hand loop 0.360 s, ``model.generate`` 0.338 s -- a tie within the machine's noise. The
  trainers use the hand loop: it samples from an explicit seeded ``torch.Generator`` (rollouts reproducible per
  seed without touching the global RNG), returns ragged responses cut at EOS, and the same loop does greedy
  evaluation.
- ``rollout_batch``: (prompt ids, response ids) -> a right-padded batch with labels on the response tokens only.
- ``MixedRLLoss``: the one ``loss_fn`` the regularizer sees in an RL step. ``DataRegularizer.step`` runs one loss on
  the merged (general + target) batch, but the general rows need the PPO/GRPO loss and the target rows the *target
  objective* (``reward`` / ``token_pg`` / ``train_loss``; see drpost.objectives.rl_target). Every row carries ``is_target``
  (R,), and the loss runs one forward and picks each row's objective, so one forward/backward still serves both.

- ``evaluate_policy`` (greedy / sampled reward, exact match, KL to the reference, retention), rewards from answer
  checks (``check_reward_fn``, ``answer_reward_fn``) and the records of a CLI run (``RLData``, ``load_rl_data``):
  the checks, retention and built-in settings are callables given by the caller (``drpost.trainers.sources``).

All per-token tensors are token-aligned (R, T) (``drpost.objectives.logprobs``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from drpost.objectives.advantages import masked_mean
from drpost.objectives.grpo import grpo_token_losses
from drpost.objectives.logprobs import aligned_token_logps, model_output, output_logits, shift_values
from drpost.objectives.ppo import ppo_token_losses

IGNORE = -100
# measured with time_rollouts (tiny world model, 1 thread, 64 prompts, 12 new tokens), seconds
ROLLOUT_TIMING = {"sample_generate": 0.360, "model.generate": 0.338}


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids exactly as ``drpost.data.collate.tokenize_prompt_completion`` encodes them (BOS first)."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", True):
        ids = [bos] + ids
    return ids


def _left_pad(prompts: list[list[int]], pad: int, device) -> tuple[Tensor, Tensor]:
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad, dtype=torch.long)  # (B, T)
    attn = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        attn[i, T - len(p):] = 1
    return ids.to(device), attn.to(device)


def _sample_token(logits: Tensor, temperature: float, top_p: float, generator) -> Tensor:
    """logits (B, V) -> sampled ids (B,)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p  # always keeps the first
        sp = sp * keep
        choice = torch.multinomial(sp / sp.sum(-1, keepdim=True), 1, generator=generator)  # (B, 1)
        return si.gather(1, choice).squeeze(1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def kv_cache_keyword(model) -> str:
    """The KV cache's forward keyword and output attribute: ``cache`` in newer transformers, ``past_key_values``
    before (the old name only warns in newer versions, on every call)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.no_grad()
def sample_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                    top_p: float = 1.0, generator: torch.Generator | None = None,
                    greedy: bool = False) -> list[list[int]]:
    """Sampled responses (token ids, EOS included when emitted) for prompt id lists; KV cache, stops early."""
    dev = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    ids, attn = _left_pad(prompts, pad, dev)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, T) positions count real tokens only
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
    kw = kv_cache_keyword(model)
    past, next_pos = getattr(out, kw), pos[:, -1:] + 1  # (B, 1)
    B = len(prompts)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    responses: list[list[int]] = [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1, :]  # (B, V)
        tok = logits.argmax(-1) if greedy else _sample_token(logits, temperature, top_p, generator)  # (B,)
        for i, t in enumerate(tok.tolist()):
            if not done[i]:
                responses[i].append(t)
        done |= tok == eos
        if bool(done.all()):
            break
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=dev)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos, use_cache=True,
                    **{kw: past})
        past, next_pos = getattr(out, kw), next_pos + 1
    model.train(was_training)
    return responses


@torch.no_grad()
def hf_sample_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                       top_p: float = 1.0) -> list[list[int]]:
    """The same through ``model.generate(do_sample=True)`` (kept for the timing comparison)."""
    dev = next(model.parameters()).device
    ids, attn = _left_pad(prompts, tokenizer.pad_token_id, dev)
    out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=temperature, top_p=top_p,
                         top_k=0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    res = []
    for row in out[:, ids.shape[1]:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        res.append([t for t in row if t != tokenizer.pad_token_id or t == tokenizer.eos_token_id])
    return res


def decode_response(tokenizer, response: list[int]) -> str:
    return tokenizer.decode([t for t in response if t != tokenizer.eos_token_id], skip_special_tokens=True)


def rollout_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict:
    """Right-padded batch (R, T): ``input_ids``, ``attention_mask``, ``labels`` (-100 except on response tokens).

    A response that is empty (cannot happen with ``max_new_tokens >= 1``) would have no loss tokens.
    """
    R = len(prompts)
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    labels = torch.full((R, T), IGNORE, dtype=torch.long)
    attn = torch.zeros((R, T), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        L = len(p) + len(r)
        input_ids[i, :L] = torch.tensor(p + r, dtype=torch.long)
        labels[i, len(p):L] = torch.tensor(r, dtype=torch.long)
        attn[i, :L] = 1
    return {"input_ids": input_ids, "attention_mask": attn, "labels": labels}


@torch.no_grad()
def forward_stats(model, batch: dict, chunk: int = 64) -> tuple[Tensor, Tensor | None]:
    """Token-aligned log-probs (R, T) of the labelled tokens, and values (R, T) when the model has a value head; run
    on the model's device, returned on the CPU (where rollout batches live)."""
    logps, values = [], []
    R = batch["input_ids"].shape[0]
    dev = next(model.parameters()).device
    for s in range(0, R, chunk):
        sub = {k: v[s:s + chunk].to(dev) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        out = model_output(model, sub)
        lp, _ = aligned_token_logps(output_logits(out), sub["labels"])
        logps.append(lp.cpu())
        v = getattr(out, "values", None)
        if isinstance(v, Tensor):
            values.append(shift_values(v).cpu())
    return torch.cat(logps), (torch.cat(values) if values else None)


def take(batch: dict, idx) -> dict:
    """Rows ``idx`` of every per-row tensor in ``batch``."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    R = batch["input_ids"].shape[0]
    return {k: (v[idx] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == R else v) for k, v in batch.items()}


def trim(batch: dict) -> dict:
    """Drop trailing all-padding columns of the (R, T) tensors (smaller mini-batches, same losses)."""
    T = int(batch["attention_mask"].sum(0).nonzero().max()) + 1
    Tfull = batch["input_ids"].shape[1]
    return {k: (v[:, :T] if isinstance(v, Tensor) and v.dim() == 2 and v.shape[1] == Tfull else v)
            for k, v in batch.items()}


class MixedRLLoss:
    """Per-row loss of a merged RL batch: the training objective on general rows, the target objective on target rows.

    ``general``: ``"ppo"`` (clipped surrogate + value loss; needs ``old_logps``, ``advantages``, ``returns``,
    ``old_values`` and a model whose output has ``values``) or ``"grpo"`` (clipped surrogate + ``kl_coef`` k3 KL to
    ``ref_logps``; needs ``old_logps``, ``advantages`` (R, T), ``ref_logps``). ``target``: ``"reward"``
    (``-sum_t logp_t * seq_weight``, count 1; ``seq_weight`` (R,) = the reward normalized over the target rollouts),
    ``"token_pg"`` (``-sum_t A_t logp_t``, count = tokens) or ``"train_loss"`` (the general objective itself).
    ``is_target`` (R,) picks the objective per row. Value-loss terms are put on general rows only.

    Returns (row_loss_sums (R,), row_counts (R,)); ``stats`` holds detached token means of the general rows.
    """

    def __init__(self, general: str = "ppo", target: str = "reward", clip_range: float = 0.2,
                 clip_range_value: float | None = 0.2, vf_coef: float = 0.1, kl_coef: float = 0.0,
                 stats: dict | None = None):
        if general not in ("ppo", "grpo"):
            raise ValueError(f"general objective must be 'ppo' or 'grpo', got {general!r}")
        target = target.replace("-", "_")
        if target not in ("reward", "token_pg", "train_loss"):
            raise ValueError(f"target objective must be reward, token_pg or train_loss, got {target!r}")
        self.general, self.target = general, target
        self.clip_range, self.clip_range_value = float(clip_range), clip_range_value
        self.vf_coef, self.kl_coef = float(vf_coef), float(kl_coef)
        self.stats = stats if stats is not None else {}

    def __call__(self, model, batch: dict) -> tuple[Tensor, Tensor]:
        out = model_output(model, batch)
        logps, mask = aligned_token_logps(output_logits(out), batch["labels"])  # (R, T) each
        m = mask.to(logps.dtype)
        is_t = batch["is_target"].to(logps.device).bool()  # (R,)
        adv = batch["advantages"].to(logps.dtype)  # (R, T)
        if self.general == "ppo":
            values = shift_values(out.values) if self.vf_coef else None
            terms = ppo_token_losses(logps, batch["old_logps"], adv, mask, self.clip_range, values=values,
                                     old_values=batch.get("old_values"), returns=batch.get("returns"),
                                     clip_range_value=self.clip_range_value, vf_coef=1.0)
            policy_rows = terms["pg"].sum(-1)  # (R,)
            value_rows = terms["vf"].sum(-1) * self.vf_coef if "vf" in terms else torch.zeros_like(policy_rows)
        else:
            terms = grpo_token_losses(logps, batch["old_logps"], adv, mask, self.clip_range,
                                      ref_logps=batch.get("ref_logps") if self.kl_coef else None,
                                      kl_coef=self.kl_coef)
            policy_rows = terms["loss"].sum(-1)
            value_rows = torch.zeros_like(policy_rows)
        tokens = m.sum(-1)  # (R,)
        if self.target == "train_loss":
            t_rows, t_counts = policy_rows, tokens
        elif self.target == "reward":
            t_rows = -(logps * m).sum(-1) * batch["seq_weight"].to(logps.dtype)
            t_counts = torch.ones_like(tokens)
        else:  # token_pg
            t_rows, t_counts = -(adv * logps * m).sum(-1), tokens
        rows = torch.where(is_t, t_rows, policy_rows + value_rows)
        counts = torch.where(is_t, t_counts, tokens)
        with torch.no_grad():
            g = (~is_t).to(m.dtype)[:, None] * m  # general response tokens
            self.stats.clear()
            self.stats["pg_loss"] = float(masked_mean(terms["pg"].detach(), g))
            self.stats["clipfrac"] = float(masked_mean(terms["clipped"], g))
            lr = terms["log_ratio"].detach()
            self.stats["approx_kl"] = float(masked_mean(torch.expm1(-lr) + lr, g))
            if "vf" in terms:
                self.stats["vf_loss"] = float(masked_mean(terms["vf"].detach(), g))
        return rows, counts.detach()


def time_rollouts(model, tokenizer, prompts: list[str], max_new_tokens: int = 12, repeats: int = 3) -> dict:
    """Seconds per rollout batch of ``prompts`` for the hand loop vs ``model.generate`` (best of ``repeats``)."""
    tok = tokenizer
    prompts = [encode_prompt(tok, p) for p in prompts]
    res = {}
    for name, fn in (("sample_generate", lambda: sample_generate(model, tok, prompts, max_new_tokens)),
                     ("model.generate", lambda: hf_sample_generate(model, tok, prompts, max_new_tokens))):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        res[name] = best
    return res


# --------------------------------------------------------------------------- evaluation and data
@torch.no_grad()
def evaluate_policy(policy, ref, tokenizer, examples: list[dict], reward_fn, max_new_tokens: int = 12,
                    retention: Callable[[torch.nn.Module], dict] | None = None, seed: int = 1234,
                    check: Callable[[str, dict], float] | None = None, greedy: bool = True) -> dict:
    """Target metrics of a policy on held-out prompts.

    ``reward`` / ``em``: mean reward and exact match (``check(decoded response, example)``, when given) of *greedy*
    responses (left out with ``greedy=False``); ``sampled_reward``: mean reward of temperature-1 samples (fixed
    generator seed); ``kl``: KL(pi || ref) per response, estimated on those samples with the k3 estimator summed over
    tokens, ``sum_t (r_t - 1 - log r_t)`` with ``r_t = ref(y_t) / pi(y_t)``: unbiased for each token's KL given its
    prefix and never negative (the plain k1 sum ``log pi - log ref`` is unbiased too but often negative on few
    samples);
    ``retention_em`` / ``retention_by_family``: ``retention(policy)`` (family -> exact match) and its mean.
    """
    from drpost.objectives.logprobs import response_mask

    prompts = [encode_prompt(tokenizer, e["prompt"]) for e in examples]
    out = {}
    if greedy:
        replies = sample_generate(policy, tokenizer, prompts, max_new_tokens, greedy=True)
        out["reward"] = float(reward_fn(prompts, replies, examples).float().mean())
        if check is not None and examples:
            out["em"] = sum(check(decode_response(tokenizer, r), e) for e, r in zip(examples, replies)) / len(examples)
    gen = torch.Generator().manual_seed(seed)
    sampled = sample_generate(policy, tokenizer, prompts, max_new_tokens, generator=gen)
    out["sampled_reward"] = float(reward_fn(prompts, sampled, examples).float().mean())
    batch = rollout_batch(prompts, sampled, tokenizer.pad_token_id)
    lp, _ = forward_stats(policy, batch)
    rp, _ = forward_stats(ref, batch)
    m = response_mask(batch["labels"]).to(lp.dtype)
    log_r = (rp - lp) * m  # (R, T) log ref/pi on the sampled tokens
    out["kl"] = float((torch.expm1(log_r) - log_r).sum(-1).mean())  # k3 per token: >= 0, unbiased
    if retention is not None:
        per = retention(policy)
        out["retention_em"] = sum(per.values()) / len(per)
        out["retention_by_family"] = per
    return out


def check_reward_fn(tokenizer, check: Callable[[str, dict], float]):
    """reward_fn from an answer check: ``float(check(decoded response, example))`` per response (1.0 = correct)."""

    def fn(prompts, responses, examples):
        return torch.tensor([float(check(decode_response(tokenizer, r), e)) for e, r in zip(examples, responses)])

    return fn


def answer_reward_fn(tokenizer, kind: str):
    """reward_fn for prompts with an ``answer``: 1.0 when ``drpost.data.verifiers`` (``exact`` / ``numeric`` /
    ``contains``) accepts the decoded response, else 0.0."""
    from drpost.data.verifiers import make_verifier

    return check_reward_fn(tokenizer, make_verifier(kind))


def load_prompt_records(path: str | None, max_n: int | None) -> list[dict] | None:
    """Prompt records from a file or dataset (``drpost.data.prompts.load_prompts``); None when ``path`` is None."""
    if path is None:
        return None
    from drpost.data.prompts import load_prompts

    return load_prompts(path, limit=max_n)


@dataclass
class RLData:
    """The records of a ``drpost dpo|rlhf|rlvr`` run: pairs (dpo) or prompts (rlhf, rlvr)."""

    general: list[dict]
    target: list[dict]
    test: list[dict]  # evaluation records (data.eval, or a built-in setting's held-out target test split)
    retention: Callable[[torch.nn.Module], dict] | None = None  # built-in settings: model -> {family: exact match}
    setting: str | None = None  # built-in setting name, None for user data


def load_rl_data(config, paradigm: str, tokenizer, setting: Callable) -> RLData:
    """``config.data`` -> records: user files / datasets (``drpost.data.prompts``; errors name file:line), or
    ``setting(config, paradigm, tokenizer, test)`` when neither ``data.general`` nor ``data.target`` is given (a
    built-in setting, ``data.setting``; ``test`` = the ``data.eval`` records or None)."""
    from drpost.config import ConfigError
    from drpost.data.prompts import load_preference_pairs, load_prompts

    d = config.data
    if (d.general is None) != (d.target is None):
        missing = "data.target" if d.target is None else "data.general"
        raise ConfigError(f"option '{missing}' is needed when the other data source is a file or dataset (set both "
                          f"data.general and data.target, or neither for a world setting)")

    def load(source, role, split, config_name, limit):
        if paradigm == "dpo":
            return load_preference_pairs(source, tokenizer, role=role, split=split, config_name=config_name,
                                         limit=limit)
        need = paradigm == "rlvr" and getattr(config.grpo, "verifier", "world") != "world"
        return load_prompts(source, tokenizer, require_answer=need, role=role, split=split,
                            config_name=config_name, limit=limit)

    test = load(d.eval, "eval", d.eval_split, None, None) if d.eval is not None else None
    if d.general is None:
        return setting(config, paradigm, tokenizer, test)
    return RLData(load(d.general, "general", d.general_split, d.general_config, d.max_general_samples),
                  load(d.target, "target", d.target_split, d.target_config, d.max_target_samples), test or [])


def truncate_prompt(ids: list[int], max_len: int | None, bos: int | None) -> list[int]:
    """The prompt's last ``max_len`` tokens (the end holds the question), BOS kept first when it led."""
    if max_len is None or len(ids) <= max_len:
        return ids
    if bos is not None and ids and ids[0] == bos:
        return [bos] + ids[len(ids) - max_len + 1:]
    return ids[len(ids) - max_len:]


def prompt_budget(config, max_new_tokens: int, option: str) -> int:
    """Prompt tokens allowed by ``data.max_seq_length`` once ``max_new_tokens`` are generated."""
    from drpost.config import ConfigError

    budget = config.data.max_seq_length - max_new_tokens
    if budget < 1:
        raise ConfigError(f"option 'data.max_seq_length' ({config.data.max_seq_length}) leaves no room for a prompt "
                          f"after {option}={max_new_tokens} generated tokens; raise it")
    return budget


def refuse_unused(config, options: dict[str, str]) -> None:
    """ConfigError naming each option of ``options`` (name -> why) whose value differs from its default: options
    this command shows (inherited) but cannot use."""
    from drpost.config import ConfigError

    default = type(config)()
    for name, why in options.items():
        value, base = config, default
        for part in name.split("."):
            value, base = getattr(value, part), getattr(base, part)
        if value != base:
            raise ConfigError(f"option '{name}' is not used by this command ({why}); remove it")
