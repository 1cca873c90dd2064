"""The world demo (``drpost demo`` / ``make demo``): a short version of the SFT quality benchmark on two CPU cores.

One built-in setting, a handful of methods side by side on the same budget, one seed, default knobs (no tuning:
the full protocol is ``drpost bench quality``). Prints one line per method and then the table, and writes
``metrics.json`` (one record per method) and ``config.yaml`` into the output directory.

With a real model (``drpost demo --model smollm2-135m-instruct``, after ``make model``) the same comparison runs
on the real-model benchmark's chat rendering of a world setting (``drpost.bench.real``), LoRA r8, with the untrained
model as the first row and smaller evaluation sets: a few minutes on two CPU cores.

Options read (``drpost demo --help``): output_dir, seed, steps, methods, verbose, data.setting, model.name_or_path,
general_batch_size, target_batch_size, optim.lr, optim.warmup_ratio, optim.max_grad_norm, and on the world model
model.size and optim.weight_decay; any other option set to a non-default value is refused by name. Without
``verbose=true`` the libraries' warnings, info logs and progress bars are hidden so that nothing prints between the
lines of the table.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from drpost.bench.quality import METHODS, markdown_table, run_one, summarize
from drpost.bench.quiet import quiet_libraries
from drpost.config import refuse_unread
from drpost.trainers.sft import SFTRecipe

DEMO_SETTING = "distribution_shift"
DEMO_KNOBS = {"mixing": 0.1, "dsir": 0.05, "less": 0.05, "global_subset": 0.5, "layerwise_subset": 0.5,
              "capped_simplex": 4}
READ = frozenset({"output_dir", "seed", "steps", "methods", "verbose", "data.setting", "model.size",
                  "model.name_or_path", "general_batch_size", "target_batch_size", "optim.lr", "optim.weight_decay",
                  "optim.warmup_ratio", "optim.max_grad_norm"})
READ_REAL = READ - {"model.size", "optim.weight_decay"}  # the real benchmark's recipe: no world size, no decay
WORLD_DEMO_STEPS = 200
REAL_DEMO_METHODS = ["full_training", "dsir", "layerwise_subset"]
REAL_DEMO_STEPS = 25


def run(config) -> list[dict]:
    """``drpost demo``: train and evaluate each of ``config.methods`` once; print and return the records."""
    if config.model.name_or_path != "world":
        return run_real(config)
    refuse_unread(config, READ, "demo")
    setting = DEMO_SETTING if config.data.setting == "default" else config.data.setting
    methods = list(config.methods)
    for m in methods:
        if m not in METHODS:
            from drpost.config import ConfigError

            raise ConfigError(f"option 'methods': {m!r} is not a method of the SFT demo; choose from "
                              f"{', '.join(sorted(METHODS))}")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("DRPOST_THREADS", 1)))  # tiny models: 1 thread is fastest on 2 cores
    o = config.optim
    steps = config.steps or WORLD_DEMO_STEPS
    budget = SFTRecipe(steps=steps, seed=config.seed, general_batch_size=config.general_batch_size,
                       target_batch_size=config.target_batch_size, lr=o.lr, weight_decay=o.weight_decay,
                       warmup_ratio=o.warmup_ratio, max_grad_norm=o.max_grad_norm)
    ctx: dict = {}
    return _demo_loop(
        config, out, methods,
        lambda m: run_one(setting, m, DEMO_KNOBS.get(m), config.seed, budget, base_size=config.model.size, n_val=50,
                          _ctx=ctx),
        lambda r: f"{r['label']:<22} target EM {r['target_em']:.3f}  target loss {r['target_loss']:.3f}  ",
        lambda rs: markdown_table(summarize(rs), f"drpost demo (setting {setting}, {steps} steps, seed {config.seed})"))


def _demo_loop(config, out: Path, methods: list[str], run, line, table) -> list[dict]:
    """Run each method (``run(method) -> record``) with the libraries quiet, print one line per record and then
    ``table(records)``; write the records to ``out/metrics.json``."""
    t0 = time.perf_counter()
    records = []
    with quiet_libraries(config.verbose):
        for m in methods:
            r = run(m)
            print(f"  {line(r)}retention EM {r['retention_em']:.3f}  ({r['wall_seconds']:.0f}s)", flush=True)
            records.append(r)
    (out / "metrics.json").write_text(json.dumps(records, indent=1))
    print()
    print(table(records))
    print(f"total {time.perf_counter() - t0:.0f}s; records in {out / 'metrics.json'}")
    return records


def run_real(config) -> list[dict]:
    """The demo on a real model: ``base`` (untrained) then each method, one seed, the real benchmark's recipe."""
    from dataclasses import replace

    from drpost.bench.real import REAL_FIXED, REAL_RECIPE, RealSizes, Worker, real_settings
    from drpost.bench.real_report import markdown as real_markdown
    from drpost.bench.real_report import summarize as real_summarize
    from drpost.config import ConfigError, DemoConfig
    from drpost.models import resolve_model

    refuse_unread(config, READ_REAL, "demo with a real model")
    setting = "sparse_related" if config.data.setting == "default" else config.data.setting
    if setting not in real_settings():
        raise ConfigError(f"option 'data.setting': {setting!r} is not a real-model setting; choose from "
                          f"{', '.join(real_settings())}")
    methods = list(config.methods) if list(config.methods) != DemoConfig().methods else REAL_DEMO_METHODS
    resolve_model(config.model.name_or_path)  # a missing model fails here, saying what to run
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    o = config.optim
    recipe = replace(REAL_RECIPE, steps=config.steps or REAL_DEMO_STEPS, lr=o.lr, warmup_ratio=o.warmup_ratio,
                     max_grad_norm=o.max_grad_norm, general_batch_size=config.general_batch_size,
                     target_batch_size=config.target_batch_size)
    sizes = RealSizes(n_pool=2000, n_val=16, n_test=100, n_retention=4)
    workers: list = []  # built on the first run, inside the quiet block (weight loading prints progress bars)

    def run(m):
        if not workers:
            workers.append(Worker(config.model.name_or_path, sizes, recipe))
        return workers[0].run(setting, m, REAL_FIXED.get(m), config.seed)

    title = f"drpost demo --model {config.model.name_or_path} (setting {setting}, {recipe.steps} steps, seed {config.seed})"
    return _demo_loop(config, out, ["base", *methods], run, lambda r: f"{r['label']:<22} target EM {r['target_em']:.3f}  ",
                      lambda rs: real_markdown(real_summarize(rs), title))
