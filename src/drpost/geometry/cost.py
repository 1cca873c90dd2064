"""Per-block cost model for ``scoring: auto``: FLOPs and memory traffic of each exact method.

For a block with factored weights of parameter shapes (p_j, q_j), n general rows, m target rows, T tokens:

==============  =====================================================  ==========================================
method          FLOPs (scores; + Gram when needed)                     bytes moved (dominant terms)
==============  =====================================================  ==========================================
full_ghost      2 n m T^2 (p+q)  (+ 2 (n+m)^2 T^2 (p+q))               token-pair tensors: n m T^2 (+ (n+m)^2 T^2)
reduced_ghost   2 (m + n) T p q                                        G_T (p q) + activations n T (p+q)
direct          2 (n+m) T p q (+ 2 (n+m)^2 p q)                        per-row gradients (n+m) p q, written + read
==============  =====================================================  ==========================================

Crossovers (paper's code): reduced vs full ghost at m* = sum(p q) / (T sum(p+q)); reduced ghost vs direct at
T* = sum(p q) / sum sqrt(p q). Time estimate = FLOPs / flops_per_s + bytes / bytes_per_s; the rates default to
conservative CPU figures and can be measured (``calibrate``). ``compress`` is approximate and never auto-chosen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from drpost.geometry.factors import Block, OneHot


@dataclass
class Rates:
    flops_per_s: float = 5e10
    bytes_per_s: float = 1e10


def block_shapes(block: Block, dense_uses: bool = False) -> list[tuple[int, int, int]]:
    """(p, q, number of uses) of each factored weight of the block; ``dense_uses``: embedding lookups (one-hot
    uses) not counted beside a dense use of the same weight (at least one use per weight)."""
    def count(us) -> int:
        return max(1, sum(not isinstance(u.a, OneHot) for u in us)) if dense_uses else len(us)

    return [(p.shape[0], p.numel() // p.shape[0], count(us)) for p, us in block.factored.items()]


def method_costs(shapes, n: int, m: int, T: int, need_gram: bool, rates: Rates, elem: int = 4) -> dict[str, float]:
    """Estimated seconds per exact method for one block (``reduced_ghost`` absent when the Gram is needed)."""
    fl = {"full_ghost": 0.0, "reduced_ghost": 0.0, "direct": 0.0}
    by = {"full_ghost": 0.0, "reduced_ghost": 0.0, "direct": 0.0}
    R = n + m
    for p, q, k in shapes:
        u2 = k * k  # pairs of uses of a tied weight
        fl["full_ghost"] += u2 * 2 * (n * m + m * m) * T * T * (p + q)
        by["full_ghost"] += u2 * (n * m + m * m) * T * T * 2 * elem
        fl["reduced_ghost"] += k * 2 * R * T * p * q
        by["reduced_ghost"] += (p * q + k * R * T * (p + q)) * elem
        fl["direct"] += k * 2 * R * T * p * q + 2 * R * p * q
        by["direct"] += 2 * R * p * q * elem
        if need_gram:
            fl["full_ghost"] += u2 * 2 * n * n * T * T * (p + q)
            by["full_ghost"] += u2 * n * n * T * T * 2 * elem
            fl["direct"] += 2 * R * R * p * q
    costs = {k: fl[k] / rates.flops_per_s + by[k] / rates.bytes_per_s for k in fl}
    if need_gram:
        del costs["reduced_ghost"]
    return costs


def choose(block: Block, n: int, m: int, T: int, need_gram: bool, rates: Rates) -> str:
    """The exact scoring method of least estimated time for this block. ``direct`` holds per-row gradients whole
    only where they are worth keeping for the assembly (else they come in chunks and the factors stay for the
    assembly), so a large-vocabulary embedding / LM head (SmolLM2-135M's tied 49,152 x 576: ~1 GB for 9
    whole rows) is priced by time alone: full ghost where its token pairs are few, direct where they are many
    (a Gram over 33 rows, or T=256)."""
    if block.rows is not None:
        return "direct"  # per-row gradients already materialized in the backward: reading them is all it takes
    # an embedding lookup (one-hot use) costs a scatter in direct and a gather / id comparison in full ghost, next
    # to nothing beside a dense use of the same weight (a tied LM head): price the dense uses only. Measured on the
    # tied SmolLM2 head, 9 rows (full ghost / direct, s): T=64 scores 0.06 / 1.0, Gram 0.42 / 1.06; T=256 scores
    # 0.88 / 2.4, Gram 7.2 / 2.3; 33 rows, T=64, Gram 6.6 / 3.9 (counting every use doubled and quadrupled both)
    shapes = block_shapes(block, dense_uses=True)
    if not shapes:
        return "direct"  # only small (materialized) parameters: every method is the same
    costs = method_costs(shapes, n, m, T, need_gram, rates)
    return min(costs, key=costs.get)


def crossover_m(shapes, T: int) -> float:
    """m* = sum(p q) / (T sum(p+q)): above it reduced ghost beats full ghost (scores only)."""
    return sum(p * q for p, q, _ in shapes) / (T * sum(p + q for p, q, _ in shapes))


def crossover_T(shapes) -> float:
    """T* = sum(p q) / sum sqrt(p q): reduced ghost vs direct."""
    return sum(p * q for p, q, _ in shapes) / sum((p * q) ** 0.5 for p, q, _ in shapes)


def calibrate(device="cpu", dtype=torch.float32, size: int = 512, repeats: int = 5) -> Rates:
    """Measure GEMM FLOP rate and copy bandwidth on this device (a few hundred ms)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    big = torch.randn(1 << 22, device=device, dtype=dtype)

    def best(fn):
        ts = []
        for _ in range(repeats):
            if device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device != "cpu":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    t_mm = best(lambda: a @ b)
    t_cp = best(lambda: big.clone())
    return Rates(flops_per_s=2 * size**3 / t_mm, bytes_per_s=2 * big.numel() * big.element_size() / t_cp)


# --------------------------------------------------------------------------- floors (system benchmark)
def gemm_seconds(shapes, rows: int, T: int, rates: Rates) -> float:
    """One weight-gradient GEMM per use, ``sum_r B_r^T A_r`` over ``rows`` rows: 2 rows T p q FLOPs each."""
    return sum(k * 2 * rows * T * p * q for p, q, k in shapes) / rates.flops_per_s


def compress_seconds(shapes, n: int, m: int, T: int, k_out: int, k_in: int, need_gram: bool, rates: Rates,
                     elem: int = 4) -> float:
    """Kronecker sketch of every row: project B and A (2 R T (p k_out + q k_in)), form the k_out x k_in sketch
    (2 R T k_out k_in); scores (and the Gram) from the (R, k_out k_in) matrix; bytes: the projected factors."""
    R = n + m
    fl = by = 0.0
    for p, q, k in shapes:
        ko, ki = min(k_out, p), min(k_in, q)
        fl += k * (2 * R * T * (p * ko + q * ki) + 2 * R * T * ko * ki) + 2 * R * ko * ki
        by += k * R * T * (ko + ki) * elem * 2
        if need_gram:
            fl += 2 * n * n * ko * ki
    return fl / rates.flops_per_s + by / rates.bytes_per_s
