"""System benchmark, arithmetic: one more step of every method with its floating-point operations counted.

Owned here: ``measure`` (per method: ``gflop`` and ``gflop_by_op``), run by ``measure.measure_case`` after the timed
repeats and the memory step. The count is ``torch.utils.flop_counter.FlopCounterMode``'s: every matrix product the
step dispatches (``mm``, ``bmm``, ``addmm``, ``baddbmm``, convolutions, and attention where torch counts it),
forward, backward, scoring and assembly alike; element-wise work is not counted. It does not depend on the load of
the machine, so it splits a method's time ratio in two: ``flop_ratio`` (its arithmetic against the standard
step's) and ``rate_ratio`` = time ratio / FLOP ratio (how much slower than the standard step it ran per counted
FLOP: the memory-bound work, small or batched products at a lower rate, Python overhead). A ratio that rises
while the FLOP ratio stays put is not work the method added.

Part of ``drpost.bench.system`` (run it with ``drpost bench system``).
"""

from __future__ import annotations

from torch.utils.flop_counter import FlopCounterMode


def measure(case, methods) -> dict[str, dict]:
    """One step of each method (``case.run``) under ``FlopCounterMode``.
    -> {method name: {"gflop": total, "gflop_by_op": {aten op: GFLOP}}}"""
    out = {}
    for me in methods:
        with FlopCounterMode(display=False) as counter:
            case.run(me)
        by_op = counter.get_flop_counts().get("Global", {})
        out[me.name] = {"gflop": counter.get_total_flops() / 1e9,
                        "gflop_by_op": {str(op).removeprefix("aten."): n / 1e9 for op, n in by_op.items()}}
    return out
