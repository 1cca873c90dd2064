"""GRPO for RLVR (Shao et al., 2024, DeepSeekMath) in drpost's per-row loss form.

Each prompt has k sampled completions with verifiable rewards; completion ``i`` gets the group-relative advantage
``A_i = (r_i - mean_group) / (std_group + eps)`` (:func:`drpost.objectives.advantages.group_advantages`), broadcast
over its response tokens. Per response token ``t`` (token-aligned layout, :mod:`drpost.objectives.logprobs`), with
``rho_t = exp(logp_t - old_logp_t)``:

    l_t = max(-A rho_t, -A clip(rho_t, 1 - eps_low, 1 + eps_high)) + kl_coef k3_t,
    k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                    (unbiased, nonnegative KL estimator)

Row form: ``row_loss = sum_t l_t``, ``count`` = number of response tokens (token-mean aggregation, as DAPO / verl's
default). ``loss_agg="seq_mean"`` instead gives ``row_loss = mean_t l_t`` and ``count = 1`` (the original GRPO's
per-sequence mean). A sample is one rollout record (no ``sample_index``) or one prompt group (``sample_index`` maps
the group's rows to one sample; :func:`group_sample_index` builds it); the per-row losses are the same either way.
Without ``old_logps`` the update is on-policy (``old = logp.detach()``, ratio 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from drpost.objectives.advantages import group_advantages
from drpost.objectives.logprobs import token_logps
from drpost.objectives.ppo import clipped_surrogate

__all__ = ["GRPOLoss", "grpo_loss_fn", "grpo_token_losses", "group_sample_index"]


def group_sample_index(num_groups: int, group_size: int, device=None) -> Tensor:
    """``sample_index`` (G*k,) that maps the k contiguous rows of each prompt group to one sample."""
    return torch.arange(num_groups, device=device).repeat_interleave(group_size)


def _broadcast_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    """(R,) sequence advantages -> (R, T); (R, T) passes through."""
    adv = advantages.to(device=like.device, dtype=like.dtype)
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(like)
    if adv.shape != like.shape:
        raise ValueError(f"advantages must be (R,) or (R, T) = {tuple(like.shape)}, got {tuple(advantages.shape)}")
    return adv


def grpo_token_losses(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip_range: float = 0.2,
                      clip_range_high: float | None = None, ref_logps: Tensor | None = None,
                      kl_coef: float = 0.0) -> dict[str, Tensor]:
    """Per-token GRPO terms. logps, old_logps, mask (bool/0-1), ref_logps: (R, T) token-aligned; advantages: (R,)
    or (R, T). Returns (R, T) tensors, 0 off the mask: ``pg``, ``kl`` (k3; present when ``ref_logps`` is given),
    ``loss`` (= pg + kl_coef kl), ``clipped``, ``ratio``, ``log_ratio``."""
    m = mask.to(logps.dtype)
    adv = _broadcast_advantages(advantages, logps)
    hi = clip_range if clip_range_high is None else clip_range_high
    out = clipped_surrogate(logps, old_logps, adv, m, clip_range, hi)
    pg = out["pg"]
    loss = pg
    if ref_logps is not None:
        d = (ref_logps.to(logps.dtype) - logps) * m  # ref - logp
        kl = (torch.expm1(d) - d) * m
        out["kl"] = kl
        if kl_coef:
            loss = loss + kl_coef * kl
    out["loss"] = loss
    return out


class GRPOLoss:
    """Per-row GRPO loss; see the module docstring. Build with :func:`grpo_loss_fn`.

    batch keys: ``input_ids`` (R, T), ``attention_mask`` (R, T), ``labels`` (R, T) (-100 off the response);
    ``advantages`` (R,) group-relative (or (R, T)) -- or, if absent, ``rewards`` (R,) with ``group_size`` set, from
    which group advantages are computed here (contiguous groups of the rows passed in); optional ``old_logps`` (R, T)
    (default: on-policy), ``ref_logps`` (R, T) (needed when ``kl_coef > 0``), ``sample_index`` (R,) (not read).
    Returns (row_loss_sums (R,), counts (R,)). ``stats`` (refilled each call; token means, detached): ``pg_loss``,
    ``kl``, ``clipfrac``, ``ratio``.
    """

    def __init__(self, clip_range: float = 0.2, clip_range_high: float | None = None, kl_coef: float = 0.0,
                 loss_agg: str = "token_mean", group_size: int | None = None, normalize_std: bool = True,
                 eps: float = 1e-6, stats: dict | None = None):
        if loss_agg not in ("token_mean", "seq_mean"):
            raise ValueError("loss_agg must be 'token_mean' or 'seq_mean'")
        self.clip_range = float(clip_range)
        self.clip_range_high = clip_range_high
        self.kl_coef = float(kl_coef)
        self.loss_agg = loss_agg
        self.group_size = group_size
        self.normalize_std = normalize_std
        self.eps = eps
        self.stats = stats if stats is not None else {}

    def _advantages(self, batch: dict) -> Tensor:
        if "advantages" in batch:
            return batch["advantages"]
        if "rewards" in batch and self.group_size:
            return group_advantages(batch["rewards"], self.group_size, self.normalize_std, self.eps)
        raise KeyError("GRPO batch needs 'advantages' (R,) or 'rewards' (R,) with group_size set")

    def __call__(self, model, batch: dict) -> tuple[Tensor, Tensor]:
        logps, mask = token_logps(model, batch)  # (R, T) each
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old
        ref = batch.get("ref_logps")
        if self.kl_coef and ref is None:
            raise KeyError("kl_coef > 0 needs 'ref_logps' (R, T) in the batch")
        terms = grpo_token_losses(logps, old, self._advantages(batch), mask, self.clip_range, self.clip_range_high,
                                  ref_logps=ref, kl_coef=self.kl_coef)
        m = mask.to(logps.dtype)
        n_tok = m.sum(-1)
        rows = terms["loss"].sum(-1)
        if self.loss_agg == "seq_mean":
            rows = rows / n_tok.clamp_min(1)
            counts = (n_tok > 0).to(logps.dtype)
        else:
            counts = n_tok
        with torch.no_grad():
            n = m.sum().clamp_min(1)
            self.stats.clear()
            self.stats.update(pg_loss=terms["pg"].detach().sum() / n, clipfrac=terms["clipped"].sum() / n,
                              ratio=terms["ratio"].detach().sum() / n)
            if "kl" in terms:
                self.stats["kl"] = terms["kl"].detach().sum() / n
        return rows, counts

    def __repr__(self) -> str:
        return (f"GRPOLoss(clip_range={self.clip_range}, clip_range_high={self.clip_range_high}, "
                f"kl_coef={self.kl_coef}, loss_agg={self.loss_agg!r})")


def grpo_loss_fn(clip_range: float = 0.2, clip_range_high: float | None = None, kl_coef: float = 0.0,
                 loss_agg: str = "token_mean", group_size: int | None = None, normalize_std: bool = True,
                 eps: float = 1e-6, stats: dict | None = None) -> GRPOLoss:
    """A ``loss_fn(model, batch)`` for GRPO rollout records (batch keys in :class:`GRPOLoss`)."""
    return GRPOLoss(clip_range=clip_range, clip_range_high=clip_range_high, kl_coef=kl_coef, loss_agg=loss_agg,
                    group_size=group_size, normalize_std=normalize_std, eps=eps, stats=stats)
