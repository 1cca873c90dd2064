"""System benchmark: wall time of each convex feasible set's solve (docs/design.md, section 3).

This module owns ``solver_cost_table``: random but gradient-like instances (per-sample token-mean gradients = a
shared direction + noise, scaled by unequal token counts; a partly aligned target), float32 on CPU by default,
timed per set, per batch size n and per scope (global: L = 1; layer: L blocks). Timings are medians over
``repeats`` runs after one warm-up run. Nothing here is asserted by tests.
"""

from __future__ import annotations

import statistics
import time

import torch

from drpost.feasible.base import StepGeometry


def random_geometry(
    n: int, L: int, p: int = 64, m: int = 1, seed: int = 0, dtype=torch.float32, device="cpu"
) -> StepGeometry:
    """A step's geometry from explicit random vectors: u_i = N_i (mu + noise_i), target g_T = mean of m rows."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(4, 64, (n,), generator=g)
    tcounts = torch.randint(4, 64, (m,), generator=g)
    mu = torch.randn(L, 1, p, generator=g)
    U = counts[None, :, None] * (mu + 1.5 * torch.randn(L, n, p, generator=g))
    HT = 0.5 * mu + 1.5 * torch.randn(L, m, p, generator=g)
    UT = tcounts[None, :, None] * HT
    gT = UT.sum(1) / tcounts.sum()
    U, UT, gT, HT = (x.to(device=device, dtype=dtype) for x in (U, UT, gT, HT))
    return StepGeometry(
        block_names=[f"block{i}" for i in range(L)],
        scores=(U @ gT.unsqueeze(-1)).squeeze(-1),
        target_sq=(gT * gT).sum(-1),
        counts=counts.to(device),
        target_counts=tcounts.to(device),
        gram=U @ U.transpose(1, 2),
        target_gram=UT @ UT.transpose(1, 2),
        target_sketch=HT,
    )


def solver_cost_table(
    ns=(8, 32, 128),
    L: int = 22,
    repeats: int = 5,
    dtype=torch.float32,
    device="cpu",
    threads: int | None = None,
) -> list[dict]:
    """Rows {set, n, scope, ms, iterations, kkt_residual} for every convex set, n in ``ns``, scope global (L=1)
    and layer (``L`` blocks). ``ms`` is the median wall time of ``coefficients`` (including the Gram-space
    transform); ``iterations`` and ``kkt_residual`` (max over blocks) come from the last run. ``threads`` sets
    torch's intra-op threads for the measurement (restored afterwards)."""
    from drpost.feasible.convex import CONVEX_SETS

    prev = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    try:
        for n in ns:
            geo = random_geometry(n, L, dtype=dtype, device=device, seed=n)
            for name, cls in CONVEX_SETS.items():
                for scope in ("global", "layer"):
                    fs = cls(scope, radius=1.0) if name == "ball" else cls(scope)
                    g = geo.summed() if scope == "global" else geo
                    out = fs.coefficients(g)  # warm-up
                    times = []
                    for _ in range(repeats):
                        if device != "cpu":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        out = fs.coefficients(g)
                        if device != "cpu":
                            torch.cuda.synchronize()
                        times.append(time.perf_counter() - t0)
                    res = out.info.get("kkt_residual")
                    rows.append(
                        {
                            "set": name,
                            "n": n,
                            "scope": scope,
                            "blocks": g.num_blocks,
                            "ms": 1e3 * statistics.median(times),
                            "iterations": int(out.info.get("iterations", 0)),
                            "kkt_residual": float(res.max()) if res is not None else 0.0,
                        }
                    )
    finally:
        torch.set_num_threads(prev)
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table of ``solver_cost_table`` rows."""
    head = f"{'set':<15}{'n':>5}  {'scope':<7}{'L':>4}{'ms':>10}{'iters':>7}{'kkt_residual':>14}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['set']:<15}{r['n']:>5}  {r['scope']:<7}{r['blocks']:>4}{r['ms']:>10.2f}{r['iterations']:>7}"
            f"{r['kkt_residual']:>14.2e}"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m drpost.bench.solver_cost
    print(format_table(solver_cost_table()))
