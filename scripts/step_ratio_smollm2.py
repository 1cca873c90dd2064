"""Dr step vs plain step on SmolLM2-135M shapes (random weights from its config: no download).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/step_ratio_smollm2.py --mode full --T 64 --threads 1 --repeats 3

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
from transformers import LlamaConfig, LlamaForCausalLM

import drpost
from drpost.objectives import causal_lm_loss

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
               num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=2048)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["full", "lora"], default="full")
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=args.layers, attn_implementation="sdpa", **SMOLLM2))
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    model.train()
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
