"""Token log-probabilities in the *token-aligned* layout shared by the DPO, PPO, GRPO and RL-target losses.

Layout. Every per-token tensor of a batch (``old_logps``, ``ref_logps`` per token, ``advantages``, ``returns``,
``old_values``) has the shape ``(R, T)`` of ``input_ids``, and column ``t`` belongs to input token ``t``: it holds the
log-probability of token ``t`` given tokens ``< t`` (or the value of the state just before token ``t`` is generated).
Column 0 has no prefix and is never a loss token. The loss mask is ``labels != -100`` (completion / response tokens
only), with ``labels[:, 0]`` ignored. This differs from :func:`drpost.objectives.sft.token_logprobs`, which returns the
shifted ``(R, T-1)`` layout; :func:`align_to_tokens` converts.

Everything here is a plain function of the model's output; nothing averages across rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from drpost.objectives.sft import token_logprobs

IGNORE = -100


def model_output(model, batch: dict):
    """Run ``model`` on a batch (``input_ids`` (R, T), optional ``attention_mask`` (R, T)) and return its output."""
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))


def output_logits(out) -> Tensor:
    """Logits (R, T, V) from a Hugging Face output, a :class:`PolicyValueOutput` or a plain tuple."""
    return out.logits if hasattr(out, "logits") else out[0]


def align_to_tokens(x: Tensor) -> Tensor:
    """Shifted (R, T-1) layout (column t scores token t+1) -> token-aligned (R, T) with a zero column 0."""
    return torch.cat([x.new_zeros(x.shape[0], 1), x], dim=1)


def shift_values(values: Tensor) -> Tensor:
    """Per-position value-head outputs (R, T) (``values[:, t]`` read at position t, i.e. after token t) ->
    token-aligned values (R, T) where column t is the value of the state *before* token t is generated."""
    return torch.cat([values.new_zeros(values.shape[0], 1), values[:, :-1]], dim=1)


def response_mask(labels: Tensor) -> Tensor:
    """Token-aligned loss mask (R, T) bool: ``labels != -100`` with column 0 always off."""
    mask = labels != IGNORE
    mask[:, 0] = False
    return mask


def aligned_token_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Token-aligned log-probs of ``labels`` and their mask.

    logits: (R, T, V); labels: (R, T) with -100 = no loss. Returns (logp (R, T), mask (R, T) bool); logp is 0 where
    the mask is off (column 0 included). Log-softmax runs in fp32 for fp16/bf16 models.
    """
    logp, mask = token_logprobs(logits, labels)  # (R, T-1)
    return align_to_tokens(logp), torch.cat([mask.new_zeros(mask.shape[0], 1), mask], dim=1)


def token_logps(model, batch: dict) -> tuple[Tensor, Tensor]:
    """Token-aligned log-probs (R, T) of the batch's labelled tokens under ``model`` (with grad) and the mask (R, T)."""
    return aligned_token_logps(output_logits(model_output(model, batch)), batch["labels"])


def sequence_logps(model, batch: dict) -> Tensor:
    """Summed log-prob (R,) of each row's labelled tokens, under ``torch.no_grad()``.

    batch: ``input_ids`` (R, T), ``attention_mask`` (R, T), ``labels`` (R, T). Use it with a frozen reference model
    (put it in eval mode yourself) to fill ``batch["ref_logps"]`` for :func:`drpost.objectives.dpo.dpo_loss_fn`.
    """
    with torch.no_grad():
        logp, _ = token_logps(model, batch)
    return logp.sum(-1)


def reference_token_logps(model, batch: dict) -> Tensor:
    """Token-aligned log-probs (R, T) under ``torch.no_grad()`` (old-policy or reference log-probs for PPO/GRPO)."""
    with torch.no_grad():
        logp, _ = token_logps(model, batch)
    return logp
