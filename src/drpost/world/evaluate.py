"""Evaluation on world examples: exact match by batched greedy decoding, and completion loss.

Owns: ``greedy_generate`` (left-padded prompts, KV cache, stops when every row emitted EOS), ``exact_match``,
``exact_match_by_family``, ``retention_exact_match`` (per family of a retention set), ``check`` (an example's
verifier on a decoded response: the answer check the trainers take as an argument) and ``eval_loss`` (token-mean
completion loss through ``drpost.objectives.causal_lm_loss``).
Exact match is scored against each example's *true* ``answer`` with the family's verifier, so noisy examples are
scored on the truth. Works with any causal LM and tokenizer with ``encode``/``decode``/``pad_token_id``/``eos_token_id``.

Try it: ``python -c "from drpost.world.evaluate import base_model_report; print(base_model_report('micro', 20))"``
(the cached base model on each family).
"""

from __future__ import annotations

import inspect
from collections import defaultdict

import torch

from drpost.data.collate import collate, tokenize_prompt_completion
from drpost.objectives.sft import causal_lm_loss
from drpost.world.tasks import verify


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _cache_names(model) -> tuple[str, str]:
    """(forward keyword, output attribute) of the KV cache: ``cache`` in newer transformers, ``past_key_values``
    before (passing the old keyword to a newer model only warns, once per call)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "cache" in inspect.signature(base.forward).parameters:
        return "cache", "cache"
    return "past_key_values", "past_key_values"


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 16) -> list[str]:
    """Greedy continuations of ``prompts`` (one batch), decoded up to the first EOS."""
    dev = _device(model)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    B, T = len(ids), max(len(x) for x in ids)
    input_ids = torch.full((B, T), pad, dtype=torch.long)  # (B, T) left-padded
    attn = torch.zeros((B, T), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, T - len(x):] = torch.tensor(x, dtype=torch.long)
        attn[i, T - len(x):] = 1
    input_ids, attn = input_ids.to(dev), attn.to(dev)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, T) positions count real tokens only
    kw, attr = _cache_names(model)
    out = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=True)
    past, next_pos = getattr(out, attr), pos[:, -1:] + 1  # (B, 1)
    new = torch.empty((B, 0), dtype=torch.long, device=dev)  # (B, t) generated so far
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for _ in range(max_new_tokens):
        tok = out.logits[:, -1, :].argmax(-1)  # (B,)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        new = torch.cat([new, tok[:, None]], dim=1)
        done |= tok == eos
        if bool(done.all()):
            break
        attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=dev)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos, use_cache=True, **{kw: past})
        past, next_pos = getattr(out, attr), next_pos + 1
    texts = []
    for row in new.tolist():
        row = row[: row.index(eos)] if eos in row else row
        texts.append(tokenizer.decode([t for t in row if t != pad], skip_special_tokens=True))
    return texts


def _max_new_tokens(tokenizer, examples: list[dict]) -> int:
    return max(len(tokenizer.encode(e["answer"], add_special_tokens=False)) for e in examples) + 2


def predict(model, tokenizer, examples: list[dict], max_new_tokens: int | None = None,
            batch_size: int = 256) -> list[str]:
    """Greedy predictions for ``examples`` (default length budget: longest true answer + 2 tokens)."""
    if not examples:
        return []
    n_new = max_new_tokens or _max_new_tokens(tokenizer, examples)
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["prompt"]))  # less padding per batch
    preds: list[str] = [""] * len(examples)
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            for i, text in zip(idx, greedy_generate(model, tokenizer, [examples[i]["prompt"] for i in idx], n_new)):
                preds[i] = text
    finally:
        model.train(was_training)
    return preds


def exact_match(model, tokenizer, examples: list[dict], max_new_tokens: int | None = None,
                batch_size: int = 256) -> float:
    """Fraction of examples whose greedy answer passes the family verifier against the true answer."""
    if not examples:
        return float("nan")
    preds = predict(model, tokenizer, examples, max_new_tokens, batch_size)
    return sum(verify(e["family"], p, e["answer"]) for e, p in zip(examples, preds)) / len(examples)


def exact_match_by_family(model, tokenizer, examples: list[dict], max_new_tokens: int | None = None,
                          batch_size: int = 256) -> dict[str, float]:
    """Exact match per family (same decoding as ``exact_match``)."""
    preds = predict(model, tokenizer, examples, max_new_tokens, batch_size)
    hits: dict[str, list[bool]] = defaultdict(list)
    for e, p in zip(examples, preds):
        hits[e["family"]].append(verify(e["family"], p, e["answer"]))
    return {f: sum(h) / len(h) for f, h in sorted(hits.items())}


def retention_exact_match(model, tokenizer, retention: dict[str, list[dict]]) -> dict[str, float]:
    """Exact match on each family's retention examples: ``{family: exact match}``."""
    return {f: exact_match(model, tokenizer, ex) for f, ex in retention.items()}


def check(prediction: str, example: dict) -> bool:
    """Whether ``prediction`` passes the example's family verifier against its true answer."""
    return verify(example["family"], prediction, example["answer"])


def has_answers(examples: list[dict]) -> bool:
    """Whether every example carries what ``check`` needs (``family`` and ``answer``)."""
    return all("family" in e and "answer" in e for e in examples)


@torch.no_grad()
def eval_loss(model, tokenizer, examples: list[dict], batch_size: int = 256, use_answer: bool = False) -> float:
    """Token-mean completion loss (completion tokens + EOS) over all examples.

    ``use_answer=True`` scores the true answer instead of the (possibly noisy) completion.
    """
    if not examples:
        return float("nan")
    dev = _device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    try:
        for s in range(0, len(examples), batch_size):
            chunk = examples[s:s + batch_size]
            rows = [tokenize_prompt_completion(tokenizer, e["prompt"], e["answer"] if use_answer else e["completion"])
                    for e in chunk]
            batch = {k: v.to(dev) for k, v in collate(rows, pad_id=tokenizer.pad_token_id).items()}
            sums, counts = causal_lm_loss(model, batch)  # (R,), (R,)
            total += float(sums.sum())
            count += float(counts.sum())
    finally:
        model.train(was_training)
    return total / max(count, 1.0)


def base_model_report(size: str = "tiny", n: int = 100) -> dict[str, dict[str, float]]:
    """Exact match and loss of the cached base model of ``size`` on ``n`` examples of each family, in the
    pretraining formats: ``{family: {"exact_match": ..., "loss": ...}}``."""
    from drpost.world.model import load_base_model
    from drpost.world.tasks import FAMILY_NAMES, PRETRAIN_FORMATS, generate_examples

    model, tok = load_base_model(size)
    out = {}
    for fam in FAMILY_NAMES:
        ex = generate_examples(n, [fam], PRETRAIN_FORMATS, seed=f"eval-{fam}")
        out[fam] = {"exact_match": exact_match(model, tok, ex), "loss": eval_loss(model, tok, ex)}
    return out
