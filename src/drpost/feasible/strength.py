"""Automatic regularization strength (docs/design.md, section 4): a radius equal to the standard error of g_T.

This module owns ``AutoStrength``, used by ``Ball(radius="auto")`` and ``slack="auto"``. The idea: trust the
target direction exactly as far as its noise allows. With m target samples per step,

    sigma^2 = mean_j ||g_j - g_T||^2 / m,      g_j = u_j / N_j,   g_T = sum_j u_j / N_T   (N_T = sum_j N_j)

(``u_j`` = gradient of target sample j's summed token loss, ``g_j`` its token-mean gradient), computed per block from
the target block of the Gram, and the radius is sigma. That is the "batch" estimate, used whenever m >= 2.

With one target sample per step (the paper's default) the batch has no spread, so a "running" estimate is kept
across steps from ``geo.target_sketch`` (sketched token-mean target-sample gradients x_j, in a sketch space that
is fixed across steps):

    e_t      = mean_j ||x_j - mu_{t-1}||^2                     spread around the running mean (before this step)
    mu_t     = EMA_decay(mean_j x_j),  bias-corrected          running mean target gradient
    v_t      = EMA_decay(e_t),          bias-corrected          running per-row spread
    radius_t = sqrt(v_t / m)

EMAs use ``decay`` (default 0.9, an effective window of about 10 steps) and Adam-style bias correction
(divide by 1 - decay^t), so the second step's radius is exactly ||x_2 - x_1|| / sqrt(m). Before any spread is
known (the first step) the radius is 0, i.e. the set itself (slack 0 / ball radius 0 = full_training). The
spread around a running mean slightly overestimates the per-row variance (the running mean's own noise, and any
drift of the target gradient during training, are included); we keep the simple formula and say so.

The instance is stateful: one per regularizer, called once per step. State is per block (L, D); if the number
of blocks or the sketch width changes, the running state restarts (info "reset": True). ``state_dict`` /
``load_state_dict`` make a resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from drpost.feasible.base import StepGeometry

ESTIMATES = ("batch", "running", "none")


def batch_standard_error(
    target_gram: Tensor,  # (L, m, m)  <u_j, u_k> of target samples (summed-loss gradients)
    target_counts: Tensor,  # (m,)     loss-token count N_j of each target sample
) -> Tensor:
    """sqrt(mean_j ||g_j - g_T||^2 / m) per block, with g_j = u_j / N_j and g_T = sum_j u_j / N_T.  -> (L,)"""
    Q = target_gram
    m = Q.shape[-1]
    Nj = target_counts.to(Q.dtype)
    NT = Nj.sum()
    diag = torch.diagonal(Q, dim1=-2, dim2=-1)  # (L, m)
    gj_sq = diag / (Nj * Nj)  # ||g_j||^2
    gj_gT = Q.sum(-1) / (Nj * NT)  # <g_j, g_T>
    gT_sq = Q.sum((-1, -2)) / (NT * NT)  # ||g_T||^2
    spread = (gj_sq - 2.0 * gj_gT + gT_sq.unsqueeze(-1)).clamp(min=0)  # (L, m)
    return (spread.mean(-1) / m).sqrt()


class AutoStrength:
    """Radius (L,) = the standard error of g_T per block; "batch" for m >= 2, else a running estimate.

    ``decay``: EMA decay of the running mean and running spread (0 <= decay < 1; default 0.9).
    Call once per step: ``radius, info = auto(geo)``; info = {"estimate": "batch" | "running" | "none",
    "steps": running steps seen, "reset": bool}. "none" = first running step, radius 0.
    """

    def __init__(self, decay: float = 0.9):
        if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not (0.0 <= float(decay) < 1.0):
            raise ValueError(f"option 'decay' must be a number in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.reset()

    def reset(self) -> None:
        self.steps = 0  # running updates of the mean
        self.spread_steps = 0  # running updates of the spread
        self.mean_raw: Tensor | None = None  # (L, D) un-corrected EMA of the mean
        self.spread_raw: Tensor | None = None  # (L,)   un-corrected EMA of the spread

    def _update_running(self, sketch: Tensor) -> tuple[Tensor | None, bool]:
        """sketch (L, m, D) -> bias-corrected running spread (L,) (None before it is known), and reset flag."""
        x = sketch
        reset = False
        if self.mean_raw is not None and (
            self.mean_raw.shape != (x.shape[0], x.shape[2]) or self.mean_raw.device != x.device
        ):
            self.reset()
            reset = True
        b = self.decay
        if self.mean_raw is not None:
            mu = self.mean_raw / (1.0 - b**self.steps)
            e = ((x - mu.unsqueeze(1).to(x.dtype)) ** 2).sum(-1).mean(-1)  # (L,)
            e = e.to(self.spread_raw.dtype) if self.spread_raw is not None else e
            self.spread_raw = e * (1.0 - b) if self.spread_raw is None else b * self.spread_raw + (1.0 - b) * e
            self.spread_steps += 1
        xm = x.mean(1)
        self.mean_raw = xm * (1.0 - b) if self.mean_raw is None else b * self.mean_raw + (1.0 - b) * xm.to(
            self.mean_raw.dtype
        )
        self.steps += 1
        if self.spread_raw is None:
            return None, reset
        return self.spread_raw / (1.0 - b**self.spread_steps), reset

    def __call__(self, geo: StepGeometry) -> tuple[Tensor, dict]:
        L = geo.num_blocks
        dtype, device = geo.scores.dtype, geo.scores.device
        m = int(geo.target_counts.shape[0])
        if geo.target_gram is None and geo.target_sketch is None:
            raise ValueError("auto strength needs geo.target_gram (m >= 2) or geo.target_sketch (m == 1)")
        spread, reset = None, False
        if geo.target_sketch is not None:  # keep the running state current whenever it can be
            spread, reset = self._update_running(geo.target_sketch.detach())
        info = {"steps": self.steps, "reset": reset}
        if m >= 2 and geo.target_gram is not None:
            r = batch_standard_error(geo.target_gram, geo.target_counts).to(dtype)
            info["estimate"] = "batch"
        elif spread is not None:
            r = (spread / m).sqrt().to(dtype)
            info["estimate"] = "running"
        else:
            r = torch.zeros(L, dtype=dtype, device=device)
            info["estimate"] = "none"
        return r.reshape(L), info

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "steps": self.steps,
            "spread_steps": self.spread_steps,
            "mean_raw": self.mean_raw,
            "spread_raw": self.spread_raw,
        }

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.steps = int(state["steps"])
        self.spread_steps = int(state["spread_steps"])
        self.mean_raw = state["mean_raw"]
        self.spread_raw = state["spread_raw"]

    def __repr__(self) -> str:
        return f"AutoStrength(decay={self.decay})"
