"""Supervised fine-tuning loss in the per-row form every drpost step consumes.

``loss_fn(model, batch) -> (row_loss_sums (R,), row_token_counts (R,))``: each row's *summed* token cross-entropy
over its loss tokens (``labels != -100``) and how many loss tokens it has. The regularizer back-propagates the sum
of all rows' losses and normalizes per sample itself (docs/design.md), so a loss function never averages.

The LM head runs only where the loss reads it: from the position before the batch's earliest loss token on
(``label_window``; a chat prompt is most of a row, and a 49k-token vocabulary makes the head a fifth of a small
model's work), for every model whose forward takes Hugging Face's ``logits_to_keep``. Same loss and gradients,
less work, no (R, T, V) logits.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor


def token_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token log-probabilities of ``labels`` and the loss mask.

    logits: (R, T, V); labels: (R, T) with -100 = no loss. Returns (logp (R, T-1), mask (R, T-1)) where
    position t scores token t+1.
    """
    # shift the labels, not the logits: a sliced (R, T-1, V) logits tensor would be copied to flatten it, one more
    # rows x T x vocab tensor (113 MB at 9 x 64 x 49,152 in fp32); the last position scores nothing
    R, T = labels.shape
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)  # (R, T)
    mask = shift_labels != -100
    safe = shift_labels.masked_fill(~mask, 0)
    flat = logits.reshape(R * T, logits.shape[-1])  # a view of contiguous logits
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # log-softmax in fp32 for low-precision models
    logp = -F.cross_entropy(flat, safe.reshape(-1), reduction="none").view(R, T)
    return (logp * mask)[:, :-1], mask[:, :-1]


_KEEPS: dict[type, bool] = {}


def accepts_logits_to_keep(model) -> bool:
    """Whether ``model``'s forward (a PEFT model's base model's) takes ``logits_to_keep`` (Hugging Face causal LMs:
    the LM head projects only the last k positions)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = type(base)
    if kind not in _KEEPS:  # a callable that is not a module (no forward of its own): full logits
        try:
            _KEEPS[kind] = "logits_to_keep" in inspect.signature(kind.forward).parameters
        except (AttributeError, TypeError, ValueError):
            _KEEPS[kind] = False
    return _KEEPS[kind]


def label_window(labels: Tensor) -> int:
    """k: the last k positions' logits are all a next-token loss on ``labels`` (R, T) reads (position t scores
    token t+1; k = T - the first position whose next token is a loss token in some row; T when none is)."""
    read = (labels[:, 1:] != -100).any(0)  # (T-1,)
    T = labels.shape[1]
    return T - int(read.nonzero()[0]) if bool(read.any()) else T


def causal_lm_loss(model, batch: dict) -> tuple[Tensor, Tensor]:
    """Per-row summed next-token cross-entropy on the loss tokens (``labels != -100``); logits only at the last
    ``label_window(labels)`` positions where the model takes ``logits_to_keep`` (module docstring).

    batch: ``input_ids`` (R, T), ``attention_mask`` (R, T), ``labels`` (R, T). Returns (loss_sums (R,), counts (R,)).
    """
    labels = batch["labels"]  # (R, T)
    T = labels.shape[1]
    keep = label_window(labels) if accepts_logits_to_keep(model) else T
    window = {"logits_to_keep": keep} if keep < T else {}
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), **window)
    logits = out.logits if hasattr(out, "logits") else out[0]  # (R, k, V): positions T-k .. T-1
    logp, mask = token_logprobs(logits, labels[:, T - logits.shape[1]:])
    return -logp.sum(-1), mask.sum(-1).to(logp.dtype)
