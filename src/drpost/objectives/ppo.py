"""PPO for RLHF (Schulman et al., 2017; Ziegler et al., 2019) in drpost's per-row loss form, with a value head.

Rollout records are (query + response) rows; per response token ``t`` (token-aligned layout, see
:mod:`drpost.objectives.logprobs`), with ratio ``rho_t = exp(logp_t - old_logp_t)``, advantage ``A_t``, value
``V_t``, rollout value ``V_old_t`` and return ``G_t``:

    pg_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))                  (clipped policy surrogate)
    vf_t = 1/2 max((V_t - G_t)^2, (V_old_t + clip(V_t - V_old_t, -eps_v, eps_v) - G_t)^2)   (clipped value loss)
    l_t  = pg_t + vf_coef vf_t  [- ent_coef H_t]

Row form: ``row_loss = sum_t l_t`` over the row's response tokens, ``count`` = its number of response tokens, so the
regularizer's token mean is the usual token-mean PPO loss. Advantages are whitened over the rollout batch *before*
(:func:`drpost.objectives.advantages.whiten`), never inside the loss (that would couple samples).

Also here: :class:`ValueHead` (a Linear on the last hidden state) and :class:`PolicyWithValue`, the ``nn.Module`` that
holds a causal LM and the head, so the regularizer's layer hooks see the head as one more linear layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from drpost.objectives.logprobs import (
    align_to_tokens,
    aligned_token_logps,
    model_output,
    output_logits,
    response_mask,
    shift_values,
)

__all__ = ["PPOLoss", "PolicyValueOutput", "PolicyWithValue", "ValueHead", "ppo_loss_fn", "ppo_token_losses",
           "token_entropy"]


class ValueHead(nn.Module):
    """Scalar value from a hidden state: ``Linear(hidden_size, 1)`` with optional dropout in front.

    forward: hidden (R, T, H) -> values (R, T). Weight init N(0, (1/sqrt(H+1))^2) scaled by ``init_scale``, bias 0.
    """

    def __init__(self, hidden_size: int, dropout: float = 0.0, init_scale: float = 1.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.summary.weight, std=init_scale / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        h = self.dropout(hidden)
        if h.dtype != self.summary.weight.dtype:
            h = h.to(self.summary.weight.dtype)
        return self.summary(h).squeeze(-1)


@dataclass
class PolicyValueOutput:
    """logits (R, T, V); values (R, T): ``values[:, t]`` is read at position t (the state after token t)."""

    logits: Tensor
    values: Tensor

    def __getitem__(self, i):  # tuple-style access, like a Hugging Face ModelOutput
        return (self.logits, self.values)[i]


class PolicyWithValue(nn.Module):
    """A causal LM plus a :class:`ValueHead` on its last hidden state.

    forward(input_ids (R, T), attention_mask (R, T) | None, **kw) -> :class:`PolicyValueOutput`. The LM is run with
    ``output_hidden_states=True`` and ``hidden_states[-1]`` (after the final norm in Hugging Face decoders) feeds the
    head. ``policy`` is the wrapped LM; ``generate`` and ``config`` pass through to it.
    """

    def __init__(self, policy: nn.Module, value_head: ValueHead | None = None, value_dropout: float = 0.0):
        super().__init__()
        self.policy = policy
        if value_head is None:
            cfg = policy.config
            cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
            value_head = ValueHead(cfg.hidden_size, dropout=value_dropout)
            p = next(policy.parameters())
            value_head.to(device=p.device, dtype=p.dtype if p.is_floating_point() else None)
        self.value_head = value_head

    @property
    def config(self):
        return self.policy.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> PolicyValueOutput:
        kwargs.pop("output_hidden_states", None)
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs)
        values = self.value_head(out.hidden_states[-1])
        return PolicyValueOutput(logits=out.logits, values=values)

    def generate(self, *args, **kwargs):
        return self.policy.generate(*args, **kwargs)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy (R, T-1) of the next-token distributions at positions 0..T-2 (shifted layout); logits (R, T, V)."""
    lg = logits[:, :-1, :]
    if lg.dtype in (torch.float16, torch.bfloat16):
        lg = lg.float()
    logp = torch.log_softmax(lg, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def clipped_surrogate(logps: Tensor, old_logps: Tensor, adv: Tensor, m: Tensor, clip_low: float,
                      clip_high: float) -> dict[str, Tensor]:
    """Per-token clipped policy surrogate max(-A r, -A clip(r, 1-low, 1+high)), r = exp(logp - old_logp).

    All (R, T), m a 0/1 float mask. Returns ``pg``, ``ratio``, ``clipped`` (1 where the clip is active), ``log_ratio``,
    each 0 off the mask. Shared by PPO (symmetric clip) and GRPO (optionally asymmetric)."""
    log_ratio = (logps - old_logps.to(logps.dtype)) * m
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2) * m
    return {"pg": pg, "ratio": ratio * m, "clipped": (pg2 > pg1).to(logps.dtype) * m, "log_ratio": log_ratio}


def ppo_token_losses(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip_range: float = 0.2,
                     values: Tensor | None = None, old_values: Tensor | None = None, returns: Tensor | None = None,
                     clip_range_value: float | None = 0.2, vf_coef: float = 0.1) -> dict[str, Tensor]:
    """Per-token PPO terms (every argument (R, T), token-aligned; mask bool/0-1 on response tokens).

    Returns a dict of (R, T) tensors, 0 off the mask: ``pg`` (clipped surrogate), ``vf`` (clipped value loss, absent
    when ``values`` is None), ``loss`` (= pg + vf_coef vf), ``clipped`` (1 where the clip is active), ``ratio``.
    ``clip_range_value=None`` disables value clipping.
    """
    m = mask.to(logps.dtype)
    out = clipped_surrogate(logps, old_logps, advantages.to(logps.dtype), m, clip_range, clip_range)
    pg = out["pg"]
    loss = pg
    if values is not None:
        if old_values is None or returns is None:
            raise ValueError("the value loss needs old_values and returns")
        ret = returns.to(values.dtype)
        vf1 = (values - ret) ** 2
        if clip_range_value is None:
            vf = 0.5 * vf1
        else:
            old_v = old_values.to(values.dtype)
            v_clip = old_v + torch.clamp(values - old_v, -clip_range_value, clip_range_value)
            vf = 0.5 * torch.maximum(vf1, (v_clip - ret) ** 2)
        vf = vf * m
        out["vf"] = vf
        loss = loss + vf_coef * vf
    out["loss"] = loss
    return out


class PPOLoss:
    """Per-row PPO loss (policy + value head); see the module docstring. Build with :func:`ppo_loss_fn`.

    model: a :class:`PolicyWithValue` (or anything whose output has ``logits`` and ``values``; with ``vf_coef=0`` a
    plain causal LM works). batch keys, all token-aligned (R, T): ``input_ids``, ``attention_mask``, ``labels``
    (-100 off the response), ``old_logps`` (rollout log-probs), ``advantages`` (already whitened if wanted),
    ``returns`` and ``old_values`` (rollout values; both needed when ``vf_coef > 0``); optional ``sample_index`` (R,)
    (not read here). Returns (row_loss_sums (R,), response_token_counts (R,)). ``stats`` (refilled each call; batch
    token means, detached): ``pg_loss``, ``vf_loss``, ``clipfrac``, ``approx_kl`` (k3), ``ratio``, ``entropy``.
    """

    def __init__(self, clip_range: float = 0.2, clip_range_value: float | None = 0.2, vf_coef: float = 0.1,
                 ent_coef: float = 0.0, stats: dict | None = None):
        self.clip_range = float(clip_range)
        self.clip_range_value = clip_range_value
        self.vf_coef = float(vf_coef)
        self.ent_coef = float(ent_coef)
        self.stats = stats if stats is not None else {}

    def __call__(self, model, batch: dict) -> tuple[Tensor, Tensor]:
        out = model_output(model, batch)
        logits = output_logits(out)
        logps, _ = aligned_token_logps(logits, batch["labels"])
        mask = response_mask(batch["labels"])
        values = None
        if self.vf_coef != 0.0:
            raw = getattr(out, "values", None)  # a Hugging Face ModelOutput's .values is dict.values: not a tensor
            if not isinstance(raw, Tensor):
                raise ValueError("vf_coef > 0 needs a model whose output has 'values' (wrap it in PolicyWithValue)")
            values = shift_values(raw)
        terms = ppo_token_losses(logps, batch["old_logps"], batch["advantages"], mask, self.clip_range,
                                 values=values, old_values=batch.get("old_values"), returns=batch.get("returns"),
                                 clip_range_value=self.clip_range_value, vf_coef=self.vf_coef)
        loss = terms["loss"]
        m = mask.to(logps.dtype)
        ent = None
        if self.ent_coef != 0.0:
            ent = align_to_tokens(token_entropy(logits)).to(loss.dtype) * m  # entropy of the dist. of token t
            loss = loss - self.ent_coef * ent
        self._fill_stats(terms, m, ent)
        return loss.sum(-1), m.sum(-1)

    def _fill_stats(self, terms: dict, m: Tensor, ent: Tensor | None) -> None:
        with torch.no_grad():
            n = m.sum().clamp_min(1)
            lr = terms["log_ratio"].detach()
            self.stats.clear()
            self.stats.update(
                pg_loss=terms["pg"].detach().sum() / n,
                clipfrac=terms["clipped"].sum() / n,
                approx_kl=((torch.expm1(-lr) + lr) * m).sum() / n,
                ratio=terms["ratio"].detach().sum() / n,
            )
            if "vf" in terms:
                self.stats["vf_loss"] = terms["vf"].detach().sum() / n
            if ent is not None:
                self.stats["entropy"] = ent.detach().sum() / n

    def __repr__(self) -> str:
        return (f"PPOLoss(clip_range={self.clip_range}, clip_range_value={self.clip_range_value}, "
                f"vf_coef={self.vf_coef}, ent_coef={self.ent_coef})")


def ppo_loss_fn(clip_range: float = 0.2, clip_range_value: float | None = 0.2, vf_coef: float = 0.1,
                ent_coef: float = 0.0, stats: dict | None = None) -> PPOLoss:
    """A ``loss_fn(model, batch)`` for PPO rollout records (batch keys in :class:`PPOLoss`)."""
    return PPOLoss(clip_range=clip_range, clip_range_value=clip_range_value, vf_coef=vf_coef, ent_coef=ent_coef,
                   stats=stats)
