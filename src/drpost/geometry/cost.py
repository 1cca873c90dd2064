"""Per-block cost model for ``scoring: auto``: FLOPs and memory traffic of each exact method.

For a block with factored weights of parameter shapes (p_j, q_j), n general rows, m target rows, T tokens (each
use of a weight at its own token count: an LM head that runs only on the loss window has k < T positions, and its
terms below take k; a weight with several uses sums them: S = sum of its uses' tokens, S^2 for the token pairs):

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


def block_shapes(block: Block, dense_uses: bool = False) -> list[tuple[int, int, int, int]]:
    """(p, q, number of uses, tokens per row summed over those uses) of each factored weight of the block;
    ``dense_uses``: embedding lookups (one-hot uses) not counted beside a dense use of the same weight (at least one
    use per weight)."""
    def counted(us) -> list:
        if not dense_uses:
            return list(us)
        dense = [u for u in us if not isinstance(u.a, OneHot)]
        return dense or list(us[:1])

    return [(p.shape[0], p.numel() // p.shape[0], max(1, len(c)), sum(_tokens(u) for u in c))
            for p, us in block.factored.items() for c in [counted(us)]]


def _tokens(u) -> int:
    """Positions per row of one use: its output gradient ``b`` is (R, T_use, d_out)."""
    return int(u.b.shape[1])


def positions(block: Block) -> int:
    """The positions per row that the block's factored uses ran on, summed (a key for the cost model's choice)."""
    return sum(_tokens(u) for us in block.factored.values() for u in us)


def _uses_tokens(shape, T: int) -> tuple[int, int, int, int]:
    """(p, q, uses, S) of a shape given as (p, q, uses) (every use at T tokens: S = uses T) or (p, q, uses, S)."""
    p, q, k = shape[:3]
    return p, q, k, (shape[3] if len(shape) > 3 else k * T)


def method_costs(shapes, n: int, m: int, T: int, need_gram: bool, rates: Rates, elem: int = 4,
                 assembly_rows: float | None = None) -> dict[str, float]:
    """Estimated seconds per exact method for one block (``reduced_ghost`` absent when the Gram is needed).
    ``shapes``: (p, q, uses) at T tokens each, or (p, q, uses, S) with S the tokens per row summed over the uses.
    ``assembly_rows``: the block is streamed when scored ``direct`` (``geometry/stream.py``: its update is then a
    GEMV over the per-row gradients direct builds anyway), so the ghost methods are charged the assembly GEMM they
    leave to do, over this many rows (the rows the set is expected to keep)."""
    fl = {"full_ghost": 0.0, "reduced_ghost": 0.0, "direct": 0.0}
    by = {"full_ghost": 0.0, "reduced_ghost": 0.0, "direct": 0.0}
    R = n + m
    for shape in shapes:
        p, q, _, S = _uses_tokens(shape, T)
        S2 = S * S  # token pairs, over every pair of uses of a tied weight
        fl["full_ghost"] += 2 * (n * m + m * m) * S2 * (p + q)
        by["full_ghost"] += (n * m + m * m) * S2 * 2 * elem
        fl["reduced_ghost"] += 2 * R * S * p * q
        by["reduced_ghost"] += (p * q + R * S * (p + q)) * elem
        fl["direct"] += 2 * R * S * p * q + 2 * R * p * q
        by["direct"] += 2 * R * p * q * elem
        if need_gram:
            fl["full_ghost"] += 2 * n * n * S2 * (p + q)
            by["full_ghost"] += n * n * S2 * 2 * elem
            fl["direct"] += 2 * R * R * p * q
        if assembly_rows is not None:
            fl["full_ghost"] += 2 * assembly_rows * S * p * q
            fl["reduced_ghost"] += 2 * assembly_rows * S * p * q
    costs = {k: fl[k] / rates.flops_per_s + by[k] / rates.bytes_per_s for k in fl}
    if need_gram:
        del costs["reduced_ghost"]
    return costs


def choose(block: Block, n: int, m: int, T: int, need_gram: bool, rates: Rates,
           assembly_rows: float | None = None) -> str:
    """The exact scoring method of least estimated time for this block, each use priced at the positions it ran on
    (its factors say; ``T`` is the batch's length): an LM head that runs on the loss window only has few token
    pairs. ``assembly_rows``: the block streams under ``direct`` (``method_costs``). Otherwise ``direct`` holds
    per-row gradients whole only where they are worth keeping for the assembly (else they come in chunks and the
    factors stay for the assembly), so a large-vocabulary embedding / LM head
    (SmolLM2-135M's tied 49,152 x 576: ~1 GB for 9 whole rows) is priced by time alone: full ghost where its token
    pairs are few, direct where they are many (a Gram over 33 rows, or T=256 at every position)."""
    if block.rows is not None:
        return "direct"  # per-row gradients already materialized in the backward: reading them is all it takes
    # an embedding lookup (one-hot use) costs a scatter in direct and a gather / id comparison in full ghost, next
    # to nothing beside a dense use of the same weight (a tied LM head): price the dense uses only. Measured on the
    # tied SmolLM2 head, 9 rows (full ghost / direct, s): T=64 scores 0.06 / 1.0, Gram 0.42 / 1.06; T=256 scores
    # 0.88 / 2.4, Gram 7.2 / 2.3; 33 rows, T=64, Gram 6.6 / 3.9 (counting every use doubled and quadrupled both)
    shapes = block_shapes(block, dense_uses=True)
    if not shapes:
        return "direct"  # only small (materialized) parameters: every method is the same
    costs = method_costs(shapes, n, m, T, need_gram, rates, assembly_rows=assembly_rows)
    return min(costs, key=costs.get)


def crossover_m(shapes, T: int) -> float:
    """m* = sum(p q) / (T sum(p+q)): above it reduced ghost beats full ghost (scores only)."""
    return sum(p * q for p, q, *_ in shapes) / (T * sum(p + q for p, q, *_ in shapes))


def crossover_T(shapes) -> float:
    """T* = sum(p q) / sum sqrt(p q): reduced ghost vs direct."""
    return sum(p * q for p, q, *_ in shapes) / sum((p * q) ** 0.5 for p, q, *_ in shapes)


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
def compress_seconds(shapes, n: int, m: int, T: int, k_out: int, k_in: int, need_gram: bool, rates: Rates,
                     elem: int = 4) -> float:
    """Kronecker sketch of every row: project B and A (2 R T (p k_out + q k_in)), form the k_out x k_in sketch
    (2 R T k_out k_in); scores (and the Gram) from the (R, k_out k_in) matrix; bytes: the projected factors.
    ``shapes`` as in ``method_costs`` (T S: the tokens of every use together)."""
    R = n + m
    fl = by = 0.0
    for shape in shapes:
        p, q, _, S = _uses_tokens(shape, T)
        ko, ki = min(k_out, p), min(k_in, q)
        fl += 2 * R * S * (p * ko + q * ki) + 2 * R * S * ko * ki + 2 * R * ko * ki
        by += R * S * (ko + ki) * elem * 2
        if need_gram:
            fl += 2 * n * n * ko * ki
    return fl / rates.flops_per_s + by / rates.bytes_per_s
