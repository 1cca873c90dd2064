"""Slack: turn any feasible set C into C + ball(r) (docs/design.md, section 3).

This module owns ``apply_slack`` (pure: coefficients of proj_C(g_T) in, coefficients of proj_{C + ball(r)}(g_T)
out), the radius-option validation shared with ``Ball``, and ``WithSlack``, a wrapper that adds slack to any
``FeasibleSet`` (the subset family included).

The projection onto C + ball(r) is

    d = p + min(1, r / ||g_T - p||) (g_T - p) = (1 - beta) p + beta g_T,      p = proj_C(g_T),

so slack 0 is C itself (coefficients unchanged) and slack inf is target_only. For sets of subset sums, which
are not convex, p is the set's own choice and d is the same formula.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from drpost.feasible.base import Coefficients, FeasibleSet, StepGeometry, solver_failure
from drpost.feasible.strength import AutoStrength


def check_radius(value, option: str = "radius", allow_none: bool = False):
    """A radius option: a number >= 0 (inf allowed) or "auto" (or None where allowed). Returns it normalized."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        if value == "auto":
            return "auto"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isnan(float(value)) and float(value) >= 0:
            return float(value)
    raise ValueError(f"option {option!r} must be >= 0 or 'auto', got {value!r}")


def residual_sq(geo: StepGeometry, coefs: Coefficients) -> Tensor:
    """||g_T - p||^2 per block (L,) for p = sum_i coef_i u_i + target_coef g_T, from the Gram, scores, ||g_T||^2.

    ||(1 - t) g_T - sum_i c_i u_i||^2 = (1 - t)^2 ||g_T||^2 - 2 (1 - t) c.s + c^T K c, clamped at 0.
    """
    if geo.gram is None:
        raise ValueError("slack needs the Gram (geo.gram)")
    c = coefs.coef.to(geo.scores.dtype)  # (L, n)
    if c.shape != geo.scores.shape:
        raise ValueError(
            f"coefficients have shape {tuple(c.shape)} but the geometry has {tuple(geo.scores.shape)}; "
            "for scope 'global' pass geo.summed()"
        )
    one_t = 1.0 - coefs.target_coef.to(c.dtype)  # (L,)
    Kc = (geo.gram @ c.unsqueeze(-1)).squeeze(-1)
    val = one_t * one_t * geo.target_sq - 2.0 * one_t * (c * geo.scores).sum(-1) + (c * Kc).sum(-1)
    return val.clamp(min=0)


def apply_slack(geo: StepGeometry, coefs: Coefficients, radius: float | Tensor) -> Coefficients:
    """Coefficients of proj_{C + ball(r)}(g_T) from those of p = proj_C(g_T): d = (1 - beta) p + beta g_T.

    geo: the geometry the coefficients were computed on (per block L; ``geo.summed()`` for scope global).
    radius: number >= 0 (inf allowed) or a tensor of shape () or (L,).
    beta = min(1, r / ||g_T - p||); r = 0 gives beta = 0 exactly (C itself), r = inf gives beta = 1 (target_only).
    When ||g_T - p|| = 0 and r > 0, beta = 1 (d = g_T = p); no NaN.
    """
    dtype = geo.scores.dtype
    r = torch.as_tensor(radius, dtype=dtype, device=geo.scores.device)
    dist = residual_sq(geo, coefs).sqrt()  # (L,)
    beta = (r / dist.clamp(min=torch.finfo(dtype).tiny)).clamp(max=1.0)
    beta = torch.where(r > 0, beta, torch.zeros_like(beta))  # r = 0: keep C exactly (also for dist = 0)
    coef = (1.0 - beta).unsqueeze(-1) * coefs.coef.to(dtype)
    tcoef = (1.0 - beta) * coefs.target_coef.to(dtype) + beta
    info = dict(coefs.info)
    info.update(slack_radius=r.expand_as(beta), slack_beta=beta, slack_distance=dist)
    return Coefficients(coef=coef, target_coef=tcoef, info=info)


class WithSlack(FeasibleSet):
    """C + ball(r) for any feasible set C: d = p + min(1, r/||g_T - p||)(g_T - p), p = C's own update.

    ``radius``: number >= 0 or "auto" (the standard error of g_T, see ``strength.AutoStrength``). Scope is the
    wrapped set's. The update contains g_T, so target rows get a backward weight.
    """

    needs_gram = True
    uses_target_rows = True

    def __init__(self, inner: FeasibleSet, radius="auto"):
        super().__init__(inner.scope)
        self.inner = inner
        self.name = inner.name
        self.radius = check_radius(radius, "slack")
        self.auto = AutoStrength() if self.radius == "auto" else None
        self.needs_target_gram = self.auto is not None or inner.needs_target_gram
        self.uses_general_rows = inner.uses_general_rows

    def coefficients(self, geo: StepGeometry) -> Coefficients:
        coefs = self.inner.coefficients(geo)
        if solver_failure(coefs.info, getattr(self.inner, "max_iter", None)) is not None:
            return coefs  # the caller falls back to standard training for this step, without slack
        scoped = geo.summed() if self.scope == "global" else geo  # the ball lives where the set's scope does
        info = {}
        if self.auto is not None:
            r, info = self.auto(scoped)
        else:
            r = self.radius
        out = apply_slack(scoped, coefs, r)
        out.info.update({"slack_" + k: v for k, v in info.items()})
        if "estimate" in info:
            out.info["estimate"] = info["estimate"]
        return out

    def __repr__(self) -> str:
        return f"WithSlack({self.inner!r}, radius={self.radius!r})"
