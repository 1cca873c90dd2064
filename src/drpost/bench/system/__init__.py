"""System benchmark (``drpost bench system``): per-component cost of one data-regularized step, analytic floors,
scoring crossovers.

For each configuration (tiny Llama size, sequence length T, n general rows, m target rows, full fine-tuning or
LoRA r=8) it times one training step of every method, split into forward, activation backward, scoring,
feasible-set solve, update assembly and optimizer step, and reports each as a ratio to a standard step (plain
token-mean forward/backward + AdamW) on the same union batch of n + m rows. Beside each one-pass measurement it
prints an analytic floor: the measured standard step, minus the weight-gradient GEMMs the one-pass backward skips,
plus one assembly GEMM per layer over the rows that carry weight, plus the FLOPs/bytes of the scoring method chosen
per block at the machine's measured GEMM rate and bandwidth (``cost.calibrate``). It also checks
``scoring="auto"`` against the best fixed exact method, and measures the two scoring crossovers (full vs reduced
ghost over m; reduced ghost vs direct over T) on one layer shape against the analytic formulas.

Modules, by job: ``cases`` (methods, models, batches, clock, one configuration's runners), ``floors`` (analytic
floors, the auto-scoring check), ``measure`` (repeats, crossovers, grids, ``run_system_bench``, the CLI runner),
``report`` (goals, summary.md, plots).

Run:
    drpost bench system quick=true output_dir=results/system      # ~10 min on 2 CPU cores
    drpost bench system --help                                    # every option
    python -m drpost.bench.system quick=true                       # the same command line

Timing: CPU = one thread by default (2 shared cores make multi-threaded timings 3-4x noisier), warm-up, then
repeats interleaved round-robin over the methods (drift hits all alike); median and IQR of per-repeat ratios.
CUDA = CUDA events per component and peak memory per method.
Writes ``system.json``, ``metrics.json``, ``summary.md``, ``breakdown.png``, ``crossovers.png`` under ``out_dir``.
"""

from drpost.bench.system.cases import (
           COMPONENTS,
           LR,
           SIZES,
           VOCAB,
           Case,
           Clock,
           Method,
           build_model,
           cfg_label,
           make_batch,
           method_list,
)
from drpost.bench.system.floors import floor, scoring_check
from drpost.bench.system.measure import crossovers, grid, main, measure_case, run, run_system_bench
from drpost.bench.system.report import GOALS, evaluate_goals, plot, write_markdown

__all__ = ["COMPONENTS", "GOALS", "LR", "SIZES", "VOCAB", "Case", "Clock", "Method", "build_model", "cfg_label",
           "crossovers", "evaluate_goals", "floor", "grid", "main", "make_batch", "measure_case", "method_list", "plot",
           "run", "run_system_bench", "scoring_check", "write_markdown"]
