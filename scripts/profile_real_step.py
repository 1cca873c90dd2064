"""Profile one Dr step against a plain step on SmolLM2-135M shapes (random weights from its config: no download).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/profile_real_step.py --mode lora --T 64 --repeats 3
    OMP_NUM_THREADS=1 .venv/bin/python scripts/profile_real_step.py --mode lora --profile cprofile --top 30
    OMP_NUM_THREADS=1 .venv/bin/python scripts/profile_real_step.py --mode full --profile torch --repeats 2

The model: ``drpost.bench.system.build_model("smollm2", ...)``, the system benchmark's LlamaForCausalLM with
SmolLM2-135M's shapes (30 layers, hidden 576, intermediate 1536, 9 heads / 3 kv heads, vocab 49152, tied
embeddings), ``torch.manual_seed(0)`` weights; ``--mode lora`` adds PEFT LoRA r 8 alpha 16 on every linear layer
(210 LoRA modules, 420 A/B matrices, B drawn from N(0, 0.02)). The timed comparison with floors and peak memory is
``drpost bench system model=smollm2``; this script is for looking inside one step. Batch: ``--rows`` general rows and ``--target`` target
rows of ``--T`` random tokens, fp32.

Plain step: token-mean loss of the same union batch (``causal_lm_loss``), backward, AdamW. Dr steps: one-pass
``layerwise_subset`` and ``global_subset`` (frac 0.5, scoring auto, or ``--scoring``) + the same AdamW. After one
warm-up step each, the steps are interleaved A/B/A/B (the order rotates every repeat) and each Dr step's ratio to the
plain step *of the same repeat* is taken; the table reports medians over ``--repeats``. The component breakdown is
the regularizer's own report (forward, backward, scoring, solve, assembly) plus the optimizer; the plain step's is
forward, backward, optimizer.

``--stages K`` also repeats only the stages after the backward (geometry, solve, assembly) K times on one captured
backward per Dr method, interleaving the methods: a cheaper, quieter look at the regularizer's own work. The factors
are held for the repeats, so memory is not reused as in a real step (where the geometry releases the factors of
blocks whose per-row gradients it keeps): fresh allocations may page-fault; trust the full steps' table first.

``--profile cprofile`` then runs one more step of each Dr method under cProfile and prints the top ``--top``
functions by own time and the own time summed per source file (where the Python goes); ``--profile torch`` runs it
under torch.profiler and prints the top operators by self CPU time and the number of operator calls (dispatch count).

``--clock cpu`` makes every clock (this script's and the regularizer's stage timer, which both read
``time.perf_counter``) read the process's CPU time (user + system) instead: on a machine shared with other jobs,
time spent waiting for a core then drops out (page faults still count). Use it with ``--threads 1``.

Machine noise: the absolute seconds are only as quiet as the machine (use ``--threads 1`` and OMP_NUM_THREADS=1 on
a shared box); compare ratios and breakdowns taken within one process.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from collections import Counter, defaultdict

import torch

from drpost.bench.system import SMOLLM2, build_model

STAGES = ("forward", "backward", "scoring", "solve", "assembly", "optimizer")


def make_runs(args):
    import drpost
    from drpost.objectives import causal_lm_loss

    model = build_model("smollm2", args.mode, args.T, "cpu", layers=args.layers)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator().manual_seed(0)

    def rows(R):
        ids = torch.randint(0, SMOLLM2["vocab_size"], (R, args.T), generator=g)  # (R, T)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    gen, tgt = rows(args.rows), rows(args.target)
    merged = drpost.step.merge_batches(gen, tgt, "cpu")
    kw = dict(frac=0.5, scoring=args.scoring)
    regs = {m: drpost.DataRegularizer(model, m, **kw) for m in args.methods}
    reports = {}

    def opt_step(t: dict) -> dict:
        t0 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t["optimizer"] = time.perf_counter() - t0
        return t

    def plain() -> dict:
        t0 = time.perf_counter()
        loss, counts = causal_lm_loss(model, merged)
        t1 = time.perf_counter()
        (loss.sum() / counts.sum()).backward()
        t2 = time.perf_counter()
        return opt_step({"forward": t1 - t0, "backward": t2 - t1})

    def dr(m: str) -> dict:
        rep = regs[m].step(gen, tgt, causal_lm_loss)
        if rep.skipped:
            raise RuntimeError(f"{m}: step skipped ({rep.skip_reason})")
        reports[m] = rep
        return opt_step(dict(rep.timings))

    runs = {"plain": plain, **{m: (lambda m=m: dr(m)) for m in args.methods}}
    return model, runs, reports, regs, gen, tgt


def timed(runs: dict, repeats: int) -> dict[str, list[dict]]:
    for f in runs.values():  # warm-up: cost-model choices, allocator
        f()
    names = list(runs)
    out: dict[str, list[dict]] = {k: [] for k in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: A B C, B C A, C A B, ...
        for k in order:
            t0 = time.perf_counter()
            comp = runs[k]()
            comp["total"] = time.perf_counter() - t0
            out[k].append(comp)
    return out


def print_table(times: dict[str, list[dict]], reports: dict) -> None:
    plain = [d["total"] for d in times["plain"]]
    print(f"{'step':18s} {'total s':>8s} {'ratio':>6s} {'[min-max]':>13s}  " + " ".join(f"{s:>9s}" for s in STAGES)
          + f" {'other':>8s}")
    for k, ds in times.items():
        tot = [d["total"] for d in ds]
        ratios = [a / b for a, b in zip(tot, plain, strict=True)]
        comp = {s: statistics.median(d.get(s, 0.0) for d in ds) for s in STAGES}
        other = statistics.median(d["total"] - sum(d.get(s, 0.0) for s in STAGES) for d in ds)
        print(f"{k:18s} {statistics.median(tot):8.3f} {statistics.median(ratios):6.3f} "
              f"[{min(ratios):.3f}-{max(ratios):.3f}]  " + " ".join(f"{comp[s]:9.4f}" for s in STAGES)
              + f" {other:8.4f}")
    for m, rep in reports.items():
        print(f"{m}: scoring choices {dict(Counter(rep.scoring.values()))}, blocks {len(rep.blocks)}")


def stages_only(model, regs: dict, gen: dict, tgt: dict, k: int) -> None:
    """Repeat geometry + solve + assembly on one captured backward per method (interleaved); medians in seconds."""
    from drpost.objectives import causal_lm_loss
    from drpost.step import MergedBatch, StepReport, Timer, _row_coefficients

    held = {}
    try:
        for m, reg in regs.items():
            mb = MergedBatch.build(gen, tgt, "cpu")
            rep = StepReport(blocks=reg.blocks)
            loss_sums = reg._forward(mb, causal_lm_loss, Timer("cpu"), rep)
            held[m] = (reg, mb, reg._backward(loss_sums, True))  # each regularizer has its own capture
        saved = {m: [(dict(b.factored), b.rows) for b in blocks] for m, (_, _, blocks) in held.items()}
        out = {m: [] for m in held}
        for _ in range(k):
            for m, (reg, mb, blocks) in held.items():
                for b, (f, r) in zip(blocks, saved[m], strict=True):  # the geometry releases factors it materialized
                    b.factored, b.rows = dict(f), r
                timer, rep = Timer("cpu"), StepReport(blocks=reg.blocks)
                geo = reg.local_geometry.geometry(reg, blocks, mb, None, timer, rep)
                with timer("solve"):
                    coefs = reg._solve(geo, None, rep)
                row_c = _row_coefficients(coefs, mb, None, len(blocks))
                with timer("assembly"):
                    reg._assemble(blocks, mb, causal_lm_loss, row_c, coefs)
                out[m].append(timer.t)
    finally:
        for reg in regs.values():
            reg.capture.reset()
        model.zero_grad(set_to_none=True)
    print(f"\nstages after one backward, median of {k}:")
    for m, ts in out.items():
        med = {s: statistics.median(t.get(s, 0.0) for t in ts) for s in ("scoring", "solve", "assembly")}
        print(f"  {m:18s} " + "  ".join(f"{s} {v:.4f}" for s, v in med.items()) + f"  sum {sum(med.values()):.4f}")


def profile_cprofile(runs: dict, methods: list[str], top: int) -> None:
    for m in methods:
        pr = cProfile.Profile()
        pr.enable()
        runs[m]()
        pr.disable()
        s = io.StringIO()
        st = pstats.Stats(pr, stream=s)
        st.sort_stats("tottime").print_stats(top)
        print(f"\n==== cProfile {m}: top {top} by own time")
        print("\n".join(s.getvalue().splitlines()[4:]))  # drop pstats' header lines
        per_file: dict[str, float] = defaultdict(float)
        calls: dict[str, int] = defaultdict(int)
        for (file, _line, _fn), (_cc, nc, tt, _ct, _callers) in st.stats.items():
            key = file.split("site-packages/")[-1].split("src/")[-1]
            per_file[key] += tt
            calls[key] += nc
        print(f"---- own time per file ({m})")
        for f, t in sorted(per_file.items(), key=lambda kv: -kv[1])[:top]:
            print(f"  {t:8.4f} s {calls[f]:8d} calls  {f}")


def profile_torch(runs: dict, methods: list[str], top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    for m in ["plain", *methods]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            runs[m]()
        ev = prof.key_averages()
        n_calls = sum(e.count for e in ev)
        print(f"\n==== torch.profiler {m}: {n_calls} operator calls")
        print(ev.table(sort_by="self_cpu_time_total", row_limit=top))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["full", "lora"], default="lora")
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rows", type=int, default=8, help="general rows")
    ap.add_argument("--target", type=int, default=1, help="target rows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scoring", default="auto")
    ap.add_argument("--methods", default="layerwise_subset,global_subset")
    ap.add_argument("--stages", type=int, default=0, help="repeat the post-backward stages K times")
    ap.add_argument("--profile", choices=["none", "cprofile", "torch"], default="none")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = ap.parse_args()
    if args.clock == "cpu":  # every perf_counter reader (drpost's Timer included) now reads process CPU time
        time.perf_counter = time.process_time
    args.methods = [m for m in args.methods.split(",") if m]
    torch.set_num_threads(args.threads)
    model, runs, reports, regs, gen, tgt = make_runs(args)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"mode {args.mode} T={args.T} rows {args.rows}+{args.target} layers {args.layers} threads "
          f"{torch.get_num_threads()} trainable {n_train / 1e6:.2f}M  repeats {args.repeats}  clock {args.clock}")
    if args.repeats:
        print_table(timed(runs, args.repeats), reports)
    if args.stages:
        stages_only(model, regs, gen, tgt, args.stages)
    if args.profile == "cprofile":
        profile_cprofile(runs, args.methods, args.top)
    elif args.profile == "torch":
        profile_torch(runs, args.methods, args.top)


if __name__ == "__main__":
    main()
