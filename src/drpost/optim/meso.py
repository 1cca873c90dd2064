"""MeSO: memory-efficient AdamW whose moments live in each 2-D weight's compressed (Kronecker-sketch) space.

This file owns ``MeSO`` and ``state_bytes``. For a 2-D weight W (d_out x d_in) with gradient G, two seeded Gaussian
sketch matrices are fixed once per parameter: P_out (k_out x d_out) and P_in (k_in x d_in), entries N(0, 1/k), so
E[P^T P] = I (the same scaling as ``geometry.kernels.Sketcher``). Each step:

    S = P_out G P_in^T                       (k_out, k_in)   gradient in sketch space
    m = b1 m + (1 - b1) S;  v = b2 v + (1 - b2) S*S          (k_out, k_in) moments (AdamW's, bias-corrected)
    D = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)      (k_out, k_in) Adam direction in sketch space
    W <- W (1 - lr wd) - lr P_out^T D P_in    (d_out, d_in)  mapped back by the transposes

Because E[P_out^T P_out] = I and E[P_in^T P_in] = I, the map back ``P^T (P G P^T) P`` is an unbiased estimate of G
for plain SGD; with Adam's normalization it is the Adam direction of the sketched problem lifted back. Where
k >= the dimension the sketch on that side is the identity (no projection), so with k_out >= d_out and
k_in >= d_in MeSO is exactly ``torch.optim.AdamW``. 1-D parameters (norm weights, biases) and anything that is not
2-D keep ordinary AdamW moments. Memory per 2-D weight: 2 k_out k_in moments (the sketch matrices are regenerated
from the seed, not stored, unless ``cache_sketches=True``).

    opt = MeSO(model.parameters(), lr=1e-5, sketch=(64, 64), seed=0)
    ...; opt.step(); opt.zero_grad()
    state_bytes(opt)   # bytes of optimizer state tensors
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _sketch_matrix(seed: int, index: int, side: int, k: int, dim: int, device, dtype) -> Tensor | None:
    """(k, dim) Gaussian with N(0, 1/k) entries (E[P^T P] = I), seeded by (seed, param index, side); None where
    k >= dim (identity)."""
    if k >= dim:
        return None
    gen = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + index * 2 + side) % (2**63))
    p = torch.randn(k, dim, generator=gen, dtype=torch.float64) / math.sqrt(k)
    return p.to(device=device, dtype=dtype)


class MeSO(torch.optim.Optimizer):
    """AdamW with moments in a fixed Kronecker sketch space for 2-D weights (see the module docstring).

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        sketch: (k_out, k_in) sketch sizes (an int means square).
        seed: seed of the sketch matrices (fixed for the run; saved in ``state_dict``).
        cache_sketches: keep the sketch matrices on the device (faster, costs k (d_out + d_in) per weight);
            otherwise they are regenerated from the seed each step.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, sketch: tuple[int, int] | int = (64, 64), seed: int = 0,
                 cache_sketches: bool = True):
        if lr < 0:
            raise ValueError(f"option 'lr' must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"option 'betas' must be in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError("options 'eps' and 'weight_decay' must be >= 0")
        k = (sketch, sketch) if isinstance(sketch, int) else tuple(sketch)
        if len(k) != 2 or min(k) < 1:
            raise ValueError(f"option 'sketch' must be (k_out, k_in) with k >= 1, got {sketch!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, sketch=k)
        super().__init__(params, defaults)
        self.seed = int(seed)
        self.cache_sketches = cache_sketches
        self._cache: dict[tuple, Tensor | None] = {}
        # a stable index per parameter (order of the groups), so the sketches survive save/load
        self._index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def _matrices(self, p: Tensor, k: tuple[int, int]) -> tuple[Tensor | None, Tensor | None]:
        i = self._index[p]
        key = (i, k, p.device, p.dtype)
        if self.cache_sketches and key in self._cache:
            return self._cache[key]
        d_out, d_in = p.shape
        m = (_sketch_matrix(self.seed, i, 0, k[0], d_out, p.device, p.dtype),
             _sketch_matrix(self.seed, i, 1, k[1], d_in, p.device, p.dtype))
        if self.cache_sketches:
            self._cache[key] = m
        return m

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd, k = group["lr"], group["betas"], group["eps"], group["weight_decay"], group["sketch"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("MeSO does not support sparse gradients")
                st = self.state[p]
                sketched = p.dim() == 2
                if sketched:
                    po, pi = self._matrices(p, k)
                    s = g if po is None else po @ g  # (k_out, d_in)
                    s = s if pi is None else s @ pi.t()  # (k_out, k_in)
                else:
                    s = g
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(s, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(s, memory_format=torch.preserve_format)
                st["step"] += 1
                t = float(st["step"])
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.lerp_(s, 1 - b1)
                v.mul_(b2).addcmul_(s, s, value=1 - b2)
                bc1, bc2 = 1 - b1**t, 1 - b2**t
                denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
                if wd != 0:
                    p.mul_(1 - lr * wd)
                if not sketched or (po is None and pi is None):  # ordinary AdamW update (identity sketch)
                    p.addcdiv_(m, denom, value=-lr / bc1)
                    continue
                d = m / denom  # (k_out, k_in) Adam direction in sketch space
                d = d if po is None else po.t() @ d  # (d_out, k_in)
                d = d if pi is None else d @ pi  # (d_out, d_in)
                p.add_(d, alpha=-lr / bc1)
        return loss

    def state_dict(self):
        sd = super().state_dict()
        sd["meso_seed"] = self.seed
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.seed = int(state_dict.pop("meso_seed", self.seed))
        self._cache = {}
        super().load_state_dict(state_dict)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by an optimizer's per-parameter state tensors (moments, step counters; not cached sketches)."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, Tensor):
                total += v.numel() * v.element_size()
    return total
