"""Direct Preference Optimization (Rafailov et al., 2023) in drpost's per-row loss form; sample = one pair.

Per pair ``j`` with chosen ``c`` and rejected ``r`` completions, policy log-prob sums ``pi_c, pi_r`` and frozen
reference sums ``ref_c, ref_r`` (over completion tokens only):

    h_j    = (pi_c - ref_c) - (pi_r - ref_r)
    loss_j = -(1 - eps) logsigmoid(beta h_j) - eps logsigmoid(-beta h_j)      (eps = label smoothing, default 0)

Row form (``loss_fn(model, batch) -> (row_loss_sums (R,), row_token_counts (R,))``): rows alternate chosen/rejected
(rows ``2j``, ``2j+1`` are pair ``j``); ``loss_j`` is placed on the chosen row and 0 on the rejected row, counts are
1 on the chosen row and 0 on the rejected row. The rejected row's log-probs enter the graph through ``loss_j``, so
its gradient flows; with ``sample_index`` mapping both rows to one sample, the sample's loss is ``loss_j`` and its
count is 1, so the regularizer's token mean becomes the pair mean (the standard DPO objective) and the sum over
rows is the sum over pairs.

The implicit rewards ``beta (pi - ref)``, their margin and the reward accuracy (chosen > rejected) are written per
pair into ``DPOLoss.stats`` (detached) for logging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from drpost.objectives.logprobs import sequence_logps, token_logps

__all__ = ["DPOLoss", "dpo_loss_fn", "dpo_pair_losses", "sequence_logps"]


def dpo_pair_losses(policy_logps: Tensor, ref_logps: Tensor, beta: float,
                    label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """DPO loss of each pair from summed log-probs.

    policy_logps, ref_logps: (2P,) summed completion log-probs, rows alternating chosen/rejected. Returns
    (loss (P,), chosen_rewards (P,), rejected_rewards (P,)) with rewards ``beta (pi - ref)`` (rewards detached).
    """
    if policy_logps.shape != ref_logps.shape or policy_logps.dim() != 1 or policy_logps.numel() % 2:
        raise ValueError(f"need (2P,) log-probs, got {tuple(policy_logps.shape)} and {tuple(ref_logps.shape)}")
    ratios = (policy_logps - ref_logps.to(policy_logps.dtype)).view(-1, 2)  # (P, 2): chosen, rejected
    h = ratios[:, 0] - ratios[:, 1]  # (P,)
    loss = -F.logsigmoid(beta * h)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-beta * h)
    rewards = (beta * ratios).detach()
    return loss, rewards[:, 0], rewards[:, 1]


class DPOLoss:
    """Per-row DPO loss; see the module docstring. Build with :func:`dpo_loss_fn`.

    batch keys: ``input_ids`` (R, T), ``attention_mask`` (R, T), ``labels`` (R, T) (-100 off the completion),
    ``ref_logps`` (R,) reference log-prob sums (:func:`sequence_logps` of the frozen reference), optional
    ``sample_index`` (R,) (both rows of a pair -> one sample; not read here). R must be even, rows alternate
    chosen/rejected. ``stats`` (a dict, refilled each call): ``chosen_rewards``, ``rejected_rewards``, ``margins``,
    ``accuracies`` (each (P,), detached).
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, stats: dict | None = None):
        if beta <= 0:
            raise ValueError("beta must be positive")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError("label_smoothing must lie in [0, 0.5)")
        self.beta = float(beta)
        self.label_smoothing = float(label_smoothing)
        self.stats = stats if stats is not None else {}

    def __call__(self, model, batch: dict) -> tuple[Tensor, Tensor]:
        if "ref_logps" not in batch:
            raise KeyError("DPO batch needs 'ref_logps' (R,): summed reference log-probs (see sequence_logps)")
        logp, _ = token_logps(model, batch)  # (R, T)
        pi = logp.sum(-1)  # (R,)
        loss, rc, rr = dpo_pair_losses(pi, batch["ref_logps"], self.beta, self.label_smoothing)
        # chosen row carries the pair loss; the rejected row carries 0 (its log-probs are in the graph via the pair)
        rows = torch.stack([loss, torch.zeros_like(loss)], dim=1).reshape(-1)  # (R,)
        counts = torch.stack([torch.ones_like(loss), torch.zeros_like(loss)], dim=1).reshape(-1).detach()
        self.stats.clear()
        self.stats.update(chosen_rewards=rc, rejected_rewards=rr, margins=rc - rr, accuracies=(rc > rr).to(rc.dtype))
        return rows, counts

    def __repr__(self) -> str:
        return f"DPOLoss(beta={self.beta}, label_smoothing={self.label_smoothing})"


def dpo_loss_fn(beta: float = 0.1, label_smoothing: float = 0.0, stats: dict | None = None) -> DPOLoss:
    """A ``loss_fn(model, batch)`` for DPO pairs (see :class:`DPOLoss` for the batch keys); ``stats`` is filled
    with per-pair rewards, margins and accuracies on every call."""
    return DPOLoss(beta=beta, label_smoothing=label_smoothing, stats=stats)
