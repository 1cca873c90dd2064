"""The paper's subset family: full_training, target_only, GlobalSubset and LayerWiseSubset.

A subset S of the general batch yields ``sum_{i in S} u_i / N_S`` (N_S = loss tokens of S): exactly the gradient
of standard training on S alone (docs/design.md, section 3). Selection modes:

* ``topk``: keep the ``k = round(frac * n)`` samples with the highest scores ``s_i = <u_i, g_T>``;
* ``filter``: drop ``ceil(frac * n_neg)`` of the ``n_neg`` negative-score samples, most negative first
  (``frac = 1`` drops them all; an all-negative block then gets a zero update);
* ``greedy``: second-order (GREATS-style): repeat k times: pick the argmax of the scores ``lr * s_i``, then subtract
  ``lr^2 K_{i,pick}`` from every remaining score (identity Hessian, self-term dropped).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from drpost.feasible.base import Coefficients, FeasibleSet, StepGeometry, check_frac, frac_to_k

SELECTIONS = ("topk", "filter", "greedy")


class FullTraining(FeasibleSet):
    """C = {sum_i u_i / N}: standard training on the general batch (the strongest regularizer)."""

    name = "full_training"

    def coefficients(self, geo: StepGeometry) -> Coefficients:
        L, n = geo.num_blocks, geo.n
        c = torch.full((L, n), 1.0, dtype=geo.scores.dtype, device=geo.scores.device) / geo.counts.sum()
        return Coefficients(c, torch.zeros(L, dtype=c.dtype, device=c.device))


class TargetOnly(FeasibleSet):
    """C = whole space: the update is g_T itself (no regularization)."""

    name = "target_only"
    uses_target_rows = True
    uses_general_rows = False

    def __init__(self):  # the whole space: a scope would change nothing, so it is refused
        super().__init__("global")

    def coefficients(self, geo: StepGeometry) -> Coefficients:
        L, n = geo.num_blocks, geo.n
        z = torch.zeros((L, n), dtype=geo.scores.dtype, device=geo.scores.device)
        return Coefficients(z, torch.ones(L, dtype=z.dtype, device=z.device))


def greedy_select(scores: Tensor, gram: Tensor, k: int, lr: float) -> Tensor:
    """GREATS-style greedy: k picks, each the argmax of ``lr s - lr^2 sum_{picked} K[:, p]``.  -> (n,) bool"""
    n = scores.shape[0]
    cur = lr * scores.clone()
    picked = torch.zeros(n, dtype=torch.bool, device=scores.device)
    for _ in range(k):
        i = int(torch.argmax(cur.masked_fill(picked, -math.inf)))
        picked[i] = True
        cur = cur - lr * lr * gram[:, i]
    return picked


class Subset(FeasibleSet):
    """C = {sum_{i in S} u_i / N_S} with S chosen by ``selection``; one S for the model (scope ``global``,
    GlobalSubset) or one per block (scope ``layer``, LayerWiseSubset)."""

    name = "subset"

    def __init__(self, scope: str = "global", frac: float = 0.5, selection: str = "topk", k: int | None = None):
        super().__init__(scope)
        if selection not in SELECTIONS:
            raise ValueError(f"option 'selection' must be one of {SELECTIONS}, got {selection!r}")
        self.frac = check_frac(frac)
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ValueError(f"option 'k' must be a positive integer, got {k!r}")
        self.k = k
        self.selection = selection
        self.needs_gram = selection == "greedy"
        self.separable = self.scope == "layer"  # each block's selection reads its own scores (and Gram) only

    def expected_kept(self, n: int) -> float:
        if self.selection == "filter":  # drops frac of the negative-score samples: about half of them negative
            return n * (1.0 - self.frac / 2)
        return float(min(self.k, n) if self.k is not None else frac_to_k(self.frac, n))

    def mask(self, geo: StepGeometry) -> Tensor:
        """(L, n) bool: the selected samples of each block."""
        s = geo.scores
        L, n = s.shape
        k = min(self.k, n) if self.k is not None else frac_to_k(self.frac, n)
        if self.selection == "topk":
            idx = torch.topk(s, k, dim=1).indices
            return torch.zeros_like(s, dtype=torch.bool).scatter_(1, idx, True)
        if self.selection == "filter":
            neg = s < 0
            n_drop = torch.ceil(self.frac * neg.sum(1).to(s.dtype) - 1e-9).long()  # (L,)
            rank = torch.argsort(torch.argsort(s, dim=1), dim=1)  # 0 = most negative
            return ~(neg & (rank < n_drop[:, None]))
        if geo.lr is None:
            raise ValueError("selection 'greedy' needs the current learning rate: pass lr= to step() or an optimizer")
        return torch.stack([greedy_select(s[l], geo.gram[l], k, geo.lr) for l in range(L)])

    def coefficients(self, geo: StepGeometry) -> Coefficients:
        m = self.mask(geo).to(geo.scores.dtype)
        n_s = m @ geo.counts.to(m.dtype)  # (L,) loss tokens of each block's subset
        coef = m / n_s.clamp_min(1e-12)[:, None]
        return Coefficients(coef, torch.zeros_like(n_s), {"selected": m.sum(1)})


class GlobalSubset(Subset):
    name = "global_subset"

    def __init__(self, scope: str = "global", **kw):
        if scope != "global":
            raise ValueError("option 'scope' must be 'global' for method 'global_subset' (use 'layerwise_subset')")
        super().__init__("global", **kw)


class LayerWiseSubset(Subset):
    name = "layerwise_subset"

    def __init__(self, scope: str = "layer", **kw):
        if scope != "layer":
            raise ValueError("option 'scope' must be 'layer' for method 'layerwise_subset' (use 'global_subset')")
        super().__init__("layer", **kw)
