"""The world demo (``drpost demo`` / ``make demo``): a short version of the SFT quality benchmark on two CPU cores.

One built-in setting, a handful of methods side by side on the same budget, one seed, default knobs (no tuning:
the full protocol is ``drpost bench quality``). Prints the table and writes ``metrics.json`` (one record per
method) and ``config.yaml`` into the output directory.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from drpost.bench.quality import METHODS, markdown_table, run_one, summarize
from drpost.trainers.sft import SFTRecipe

DEMO_SETTING = "distribution_shift"
DEMO_KNOBS = {"mixing": 0.1, "dsir": 0.05, "less": 0.05, "global_subset": 0.5, "layerwise_subset": 0.5,
              "capped_simplex": 4}


def run(config) -> list[dict]:
    setting = getattr(getattr(config, "data", None), "setting", None)
    setting = DEMO_SETTING if setting in (None, "default") else setting
    steps = int(getattr(config, "steps", 150))
    seed = int(getattr(config, "seed", 0))
    methods = list(getattr(config, "methods", None) or ["full_training", "target_only", "dsir", "global_subset",
                                                         "layerwise_subset", "hull"])
    size = os.environ.get("DRPOST_DEMO_SIZE", "tiny")
    out = Path(getattr(config, "output_dir", "runs/demo"))
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("DRPOST_THREADS", 1)))  # tiny models: 1 thread is fastest on 2 cores
    budget = SFTRecipe(steps=steps, seed=seed)
    t0 = time.perf_counter()
    ctx: dict = {}
    records = []
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"option 'methods': unknown method {m!r}; choose from {sorted(METHODS)}")
        r = run_one(setting, m, DEMO_KNOBS.get(m), seed, budget, base_size=size, n_val=50, _ctx=ctx)
        print(f"  {METHODS[m][0]:<16} target EM {r['target_em']:.3f}  target loss {r['target_loss']:.3f}  "
              f"retention EM {r['retention_em']:.3f}  ({r['wall_seconds']:.0f}s)", flush=True)
        records.append(r)
    (out / "metrics.json").write_text(json.dumps(records, indent=1))
    print()
    print(markdown_table(summarize(records), f"drpost demo (setting {setting}, {steps} steps, seed {seed})"))
    print(f"total {time.perf_counter() - t0:.0f}s; records in {out / 'metrics.json'}")
    return records
