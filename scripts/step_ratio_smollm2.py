"""Dr step vs plain step on SmolLM2-135M shapes (random weights from its config: no download).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/step_ratio_smollm2.py --mode full --T 64 --threads 1 --repeats 3

The model is ``drpost.bench.system.build_model("smollm2", ...)``, the system benchmark's: LoRA B is drawn from
N(0, 0.02) (PEFT starts it at zero), so the adapters' gradients are generic. The system benchmark times the same
steps with floors, per-component breakdowns and peak memory: ``drpost bench system model=smollm2 quick=true``.

Plain step: the model's own token-mean loss on the merged batch (8 general + 1 target rows), backward, AdamW.
Dr steps: one-pass ``layerwise_subset`` and ``global_subset`` (frac 0.5, scoring auto) + the same AdamW. Steps are
interleaved (plain, layerwise, global) and the median of ``--repeats`` is reported with the last report's per-stage
timings. A quick check, not the system benchmark (``drpost bench system``): its numbers are only as quiet as the
machine it runs on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter

import torch

import drpost
from drpost.bench.system import SMOLLM2, build_model
from drpost.objectives import causal_lm_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["full", "lora"], default="full")
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model("smollm2", args.mode, args.T, "cpu", layers=args.layers)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator().manual_seed(0)

    def rows(R):
        ids = torch.randint(0, SMOLLM2["vocab_size"], (R, args.T), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    gen, tgt = rows(8), rows(1)
    merged = drpost.step.merge_batches(gen, tgt, "cpu")
    regs = {m: drpost.DataRegularizer(model, m, frac=0.5, scoring="auto") for m in ("layerwise_subset", "global_subset")}
    reports = {}

    def plain():
        model(**merged).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def dr(m):
        reports[m] = regs[m].step(gen, tgt, causal_lm_loss)
        opt.step()
        opt.zero_grad(set_to_none=True)

    runs = {"plain": plain, "layerwise_subset": lambda: dr("layerwise_subset"),
            "global_subset": lambda: dr("global_subset")}
    for f in runs.values():  # warm-up (cost-model choices, allocator)
        f()
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"args": vars(args), "median_s": med, "ratio": {k: v / med["plain"] for k, v in med.items()},
           "stages_s": {m: r.timings for m, r in reports.items()},
           "scoring": {m: dict(Counter(r.scoring.values())) for m, r in reports.items()}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
