"""RL target objectives: the losses whose gradient on the *target* prompts' rollouts defines ``g_T`` in RLHF/RLVR.

The paper uses three (see docs/design.md for the step they feed), all in the per-row loss form
``loss_fn(model, batch) -> (row_loss_sums (R,), row_counts (R,))`` on token-aligned rollout rows:

- ``reward``: ``-E_y[log pi(y|x) normalize(R(x, y))]`` -- REINFORCE on the normalized sequence reward:
  ``row_loss = -sum_t logp_t * Rn`` with ``Rn`` the row's normalized reward; count 1 per row (an expectation over
  sequences; ``per="token"`` counts response tokens instead).
- ``token_pg``: token-level policy gradient with advantages: ``row_loss = -sum_t A_t logp_t``; count = response
  tokens. (Its gradient equals the PPO surrogate's at ratio 1.)
- ``train_loss``: the full PPO loss (:class:`drpost.objectives.ppo.PPOLoss`) on the target rollouts.

Reward normalization mixes rows, but only through constants (rewards are data, not functions of the parameters), so
each row's gradient still depends on that row alone. ``normalize="batch"`` standardizes over the rows passed in
(one row normalizes to 0: use several target rollouts per step, or pass ``"none"`` with rewards you normalized
yourself, e.g. with running statistics); ``"group"`` standardizes within contiguous prompt groups of ``group_size`` rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from drpost.objectives.advantages import group_advantages
from drpost.objectives.logprobs import token_logps
from drpost.objectives.ppo import PPOLoss

__all__ = ["RewardObjective", "TokenPGObjective", "normalize_rewards", "rl_target_loss_fn", "TARGET_OBJECTIVES"]

TARGET_OBJECTIVES = ("reward", "token_pg", "train_loss")


@torch.no_grad()
def normalize_rewards(rewards: Tensor, how: str = "batch", group_size: int | None = None,
                      eps: float = 1e-6) -> Tensor:
    """Normalize sequence rewards (R,): ``"batch"`` = (r - mean) / (std + eps) over all rows (std 0 for one row),
    ``"group"`` = the same within contiguous groups of ``group_size``, ``"none"`` = unchanged."""
    r = rewards.detach()
    if not r.is_floating_point():
        r = r.to(torch.get_default_dtype())
    if how == "none":
        return r
    if how == "batch":
        return group_advantages(r, r.numel(), normalize_std=True, eps=eps)
    if how == "group":
        if not group_size:
            raise ValueError("normalize='group' needs group_size")
        return group_advantages(r, group_size, normalize_std=True, eps=eps)
    raise ValueError(f"unknown normalization {how!r}")


class RewardObjective:
    """``reward`` target objective. batch keys: ``input_ids`` (R, T), ``attention_mask`` (R, T), ``labels`` (R, T)
    (-100 off the response), ``rewards`` (R,) sequence rewards. Returns (-sum_t logp_t * Rn (R,), counts (R,))."""

    def __init__(self, normalize: str = "batch", group_size: int | None = None, per: str = "sequence",
                 eps: float = 1e-6):
        if per not in ("sequence", "token"):
            raise ValueError("per must be 'sequence' or 'token'")
        if normalize not in ("batch", "group", "none"):
            raise ValueError("normalize must be 'batch', 'group' or 'none'")
        if normalize == "group" and not group_size:
            raise ValueError("normalize='group' needs group_size")
        self.normalize, self.group_size, self.per, self.eps = normalize, group_size, per, eps

    def __call__(self, model, batch: dict) -> tuple[Tensor, Tensor]:
        logps, mask = token_logps(model, batch)  # (R, T)
        rn = normalize_rewards(batch["rewards"], self.normalize, self.group_size, self.eps).to(logps.dtype)
        rows = -(logps.sum(-1) * rn)
        if self.per == "token":
            counts = mask.to(logps.dtype).sum(-1)
        else:
            counts = torch.ones_like(rows).detach()
        return rows, counts

    def __repr__(self) -> str:
        return f"RewardObjective(normalize={self.normalize!r}, per={self.per!r})"


class TokenPGObjective:
    """``token_pg`` target objective. batch keys: ``input_ids``, ``attention_mask``, ``labels``, ``advantages``
    (R, T) token-aligned (or (R,) sequence advantages, broadcast). Returns (-sum_t A_t logp_t (R,), tokens (R,))."""

    def __call__(self, model, batch: dict) -> tuple[Tensor, Tensor]:
        logps, mask = token_logps(model, batch)  # (R, T)
        adv = batch["advantages"].to(device=logps.device, dtype=logps.dtype)
        if adv.dim() == 1:
            adv = adv[:, None]
        m = mask.to(logps.dtype)
        return -(adv.detach() * logps * m).sum(-1), m.sum(-1)

    def __repr__(self) -> str:
        return "TokenPGObjective()"


def rl_target_loss_fn(kind: str, **kwargs):
    """The target objective ``kind`` in ``("reward", "token_pg", "train_loss")`` as a ``loss_fn(model, batch)``.

    kwargs go to :class:`RewardObjective` (``normalize``, ``group_size``, ``per``, ``eps``), nothing for
    ``token_pg``, and :class:`drpost.objectives.ppo.PPOLoss` for ``train_loss`` (``clip_range``,
    ``clip_range_value``, ``vf_coef``, ``ent_coef``). ``"token-pg"`` / ``"train-loss"`` spellings are accepted.
    """
    k = kind.replace("-", "_")
    if k == "reward":
        return RewardObjective(**kwargs)
    if k == "token_pg":
        if kwargs:
            raise TypeError(f"token_pg takes no options, got {sorted(kwargs)}")
        return TokenPGObjective()
    if k == "train_loss":
        return PPOLoss(**kwargs)
    raise ValueError(f"unknown RL target objective {kind!r}; choose from {TARGET_OBJECTIVES}")
