"""Supervised fine-tuning loss in the per-row form every drpost step consumes.

``loss_fn(model, batch) -> (row_loss_sums (R,), row_token_counts (R,))``: each row's *summed* token cross-entropy
over its loss tokens (``labels != -100``) and how many loss tokens it has. The regularizer back-propagates the sum
of all rows' losses and normalizes per sample itself (docs/design.md), so a loss function never averages.
"""

from __future__ import annotations

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


def causal_lm_loss(model, batch: dict) -> tuple[Tensor, Tensor]:
    """Per-row summed next-token cross-entropy on the loss tokens (``labels != -100``).

    batch: ``input_ids`` (R, T), ``attention_mask`` (R, T), ``labels`` (R, T). Returns (loss_sums (R,), counts (R,)).
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    logits = out.logits if hasattr(out, "logits") else out[0]
    logp, mask = token_logprobs(logits, batch["labels"])
    return -logp.sum(-1), mask.sum(-1).to(logp.dtype)
