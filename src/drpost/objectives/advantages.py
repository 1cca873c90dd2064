"""Advantage estimation and KL-coefficient control for the RL paradigms (RLHF with PPO, RLVR with GRPO).

Owns the rollout-side arithmetic that turns rewards into the per-token quantities the PPO/GRPO losses consume:

- :func:`gae`: generalized advantage estimation (Schulman et al., 2016) on token-level rewards,
  ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, with ``V`` and ``A`` zero after the
  last response token; returns ``R_t = A_t + V_t``.
- :func:`whiten`: masked standardization (PPO normalizes advantages over the whole rollout batch).
- :func:`group_advantages`: GRPO's group-relative advantage ``(r - mean_group) / (std_group + eps)``
  (Shao et al., 2024), one scalar per completion, broadcast over its response tokens by the loss.
- :func:`kl_penalized_rewards`: RLHF per-token rewards ``-kl_coef * KL_t`` plus the sequence score on the last
  response token (Ziegler et al., 2019).
- :class:`AdaptiveKLController` (Ziegler et al., 2019: ``beta <- beta (1 + clip(KL/target - 1, -0.2, 0.2) n/horizon)``)
  and :class:`FixedKLController`.

All of these are computed from rollout data, without gradient, *before* the per-row losses: anything that mixes rows
(whitening, group statistics) belongs here and not inside a ``loss_fn`` (whose per-sample losses must not couple
samples). Per-token tensors use the token-aligned layout of :mod:`drpost.objectives.logprobs`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over ``mask`` (same shape; bool or 0/1), over all entries or along ``dim``."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp_min(1)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries of ``x`` (over all of them), Bessel-corrected when ``unbiased``."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n.clamp_min(1)
    ss = (((x - mean) * m) ** 2).sum()
    denom = (n - 1) if unbiased else n
    return ss / denom.clamp_min(1)


@torch.no_grad()
def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8, unbiased: bool = True) -> Tensor:
    """Standardize the masked entries of ``x`` to mean 0 and variance 1; masked-off entries become 0.

    x: (...); mask: (...) same shape, bool or 0/1. With ``shift_mean=False`` the mean is added back (scale only).
    """
    x = x.detach()
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=unbiased)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation on token-level rewards.

    rewards: (B, T) per-token rewards; values: (B, T) value of the state before each token; mask: (B, T) bool/0-1,
    on for response tokens (right-padded; a prompt prefix of zeros is fine). The episode ends after the last
    masked-on token (bootstrap value 0). Masked-off positions are skipped: the recursion links each response token to
    the next masked-on one, so holes and left offsets are handled. Returns (advantages (B, T), returns (B, T)), both 0
    where the mask is off; ``returns = advantages + values``. Computed without gradient.
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(f"shape mismatch: rewards {tuple(rewards.shape)}, values {tuple(values.shape)}, "
                         f"mask {tuple(mask.shape)}")
    rewards, values = rewards.detach(), values.detach()
    on = mask.bool()
    m = on.to(values.dtype)
    B, T = rewards.shape
    adv = torch.zeros_like(values)
    next_value = values.new_zeros(B)  # V of the next response token (0 after the last one)
    next_adv = values.new_zeros(B)
    for t in range(T - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m[:, t]
        next_value = torch.where(on[:, t], values[:, t], next_value)
        next_adv = torch.where(on[:, t], a, next_adv)
    returns = (adv + values) * m
    return adv, returns


@torch.no_grad()
def group_advantages(rewards: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6,
                     unbiased: bool = True) -> Tensor:
    """GRPO group-relative advantages.

    rewards: (G*k,) sequence rewards, the k completions of each prompt contiguous. Returns (G*k,):
    ``(r - mean_group)`` divided by ``(std_group + eps)`` when ``normalize_std`` (Bessel-corrected std by default, as
    ``torch.std``; a group of one has std 0). A group whose rewards are all equal gets advantage 0.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be (G*k,) with k={group_size}, got {tuple(rewards.shape)}")
    r = rewards.detach().reshape(-1, group_size)
    if not r.is_floating_point():
        r = r.to(torch.get_default_dtype())
    centered = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        if group_size > 1:
            std = r.std(dim=1, keepdim=True, unbiased=unbiased)
        else:
            std = torch.zeros_like(r)
        centered = centered / (std + eps)
    same = (r == r[:, :1]).all(dim=1, keepdim=True)  # all-equal group: exactly 0 (no rounding noise, no 0/0)
    return torch.where(same, torch.zeros_like(centered), centered).reshape(-1)


@torch.no_grad()
def kl_penalized_rewards(scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, kl_coef: float,
                         estimator: str = "k1") -> tuple[Tensor, Tensor]:
    """RLHF token rewards: ``-kl_coef * KL_t`` on every response token plus ``scores`` on the last one.

    scores: (B,) reward-model scores; logps, ref_logps: (B, T) token-aligned log-probs of the sampled tokens under the
    rollout policy and the reference; mask: (B, T) response tokens (each row needs at least one). ``estimator``:
    ``"k1"`` (``logp - ref``), ``"k3"`` (``exp(ref - logp) - (ref - logp) - 1``) or ``"abs"``. Returns
    (rewards (B, T), kl (B, T)), both 0 off the mask.
    """
    m = mask.to(logps.dtype)
    log_ratio = (logps - ref_logps).detach()
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k3":
        kl = torch.expm1(-log_ratio) + log_ratio
    elif estimator == "abs":
        kl = log_ratio.abs()
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}")
    kl = kl * m
    rewards = -kl_coef * kl
    T = mask.shape[1]
    last = (torch.arange(T, device=mask.device) * mask.bool()).amax(dim=1)  # (B,) index of the last response token
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores.detach().to(rewards.dtype)
    return rewards, kl


class FixedKLController:
    """Constant KL coefficient; ``update`` does nothing."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019).

    After a round of ``n_steps`` samples with measured KL ``current_kl``:
    ``e = clip(current_kl / target - 1, -0.2, 0.2)``, ``value *= 1 + e * n_steps / horizon``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError("target and horizon must be positive")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])
