"""System benchmark (``drpost bench system``): per-component cost of one data-regularized step, analytic floors,
scoring crossovers.

For each configuration (model: a tiny Llama size, or SmolLM2-135M's shapes with random weights; sequence length T,
n general rows, m target rows, full fine-tuning or LoRA r=8) it times one training step of every method, split into
forward, activation backward, scoring, feasible-set solve, update assembly and optimizer step, and reports each as a
ratio to a standard step (plain token-mean forward/backward + AdamW) on the same union batch of n + m rows. Beside
each regularizer measurement it prints an analytic floor of what the engine runs (``floors``: the measured standard
step, minus the weight-gradient GEMMs the captured backward skips, plus the per-row gradients it materializes for
LoRA-sized weights, plus the scoring FLOPs/bytes of the method chosen per block, plus the assembly: one GEMM per use
over the rows that carry weight, or one GEMV per weight over held per-row gradients, at the machine's measured GEMM
rate and bandwidth). After the timed repeats it runs one more step of every method for its peak memory
(``memory``: CPU peak RSS, CUDA max_memory_allocated; ratios to the standard step) and reports the logits' share,
and one more with its matrix-product FLOPs counted (``flops``: the FLOP ratio to the standard step, and the rate
ratio = time ratio / FLOP ratio, which separates work a method adds from work it runs slowly).
On the tiny sizes it also checks ``scoring="auto"`` against the best fixed exact method; and it measures the two
scoring crossovers (full vs reduced ghost over m; reduced ghost vs direct over T) on one layer shape against the
analytic formulas.

Modules, by job: ``cases`` (methods, models, batches, clock, one configuration's runners), ``floors`` (analytic
floors, the auto-scoring check), ``memory`` (peak memory per method, logits bytes), ``flops`` (counted FLOPs per
method), ``measure`` (repeats,
crossovers, grids, ``run_system_bench``, the CLI runner), ``report`` (goals, summary.md, plots).

Run:
    drpost bench system quick=true output_dir=results/system      # ~10 min on 2 CPU cores
    drpost bench system model=smollm2 output_dir=results/system/smollm2   # SmolLM2-135M shapes (hours, 1 thread)
    drpost bench system model=smollm2 micro=true output_dir=/tmp/s  # the same path on a 2-layer SmolLM2, seconds
    drpost bench system --help                                    # every option
    python -m drpost.bench.system quick=true                       # the same command line

Timing: CPU = one thread by default (2 shared cores make multi-threaded timings 3-4x noisier), warm-up, then
repeats interleaved round-robin over the methods (drift hits all alike); median and IQR of per-repeat ratios.
CUDA = CUDA events per component. Memory: one extra step per method after the timed ones (``memory``).
Writes ``system.json``, ``metrics.json``, ``summary.md``, ``breakdown.png``, ``crossovers.png`` under ``out_dir``.
"""

from drpost.bench.system.cases import (
           COMPONENTS,
           LR,
           MODELS,
           SIZES,
           SMOLLM2,
           VOCAB,
           Case,
           Clock,
           Method,
           build_model,
           cfg_label,
           llama_config,
           make_batch,
           method_list,
)
from drpost.bench.system.floors import block_weights, floor, scoring_check
from drpost.bench.system.measure import (
           BENCH_MODELS,
           crossovers,
           grid,
           main,
           measure_case,
           run,
           run_system_bench,
)
from drpost.bench.system.report import GOALS, evaluate_goals, plot, write_markdown

__all__ = ["BENCH_MODELS", "COMPONENTS", "GOALS", "LR", "MODELS", "SIZES", "SMOLLM2", "VOCAB", "Case", "Clock",
           "Method", "block_weights", "build_model", "cfg_label", "crossovers", "evaluate_goals", "floor", "grid",
           "llama_config", "main", "make_batch", "measure_case", "method_list", "plot", "run", "run_system_bench",
           "scoring_check", "write_markdown"]
