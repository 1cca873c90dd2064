"""Quality benchmark (SFT): settings x methods x seeds on the world, with knobs tuned on a validation split.

Python entry point (what the CLI writes, as records):

    from drpost.bench.quality import run_quality
    records = run_quality(setting, methods=["full_training", "layerwise_subset"], seeds=[0, 1, 2],
                          budget=SFTRecipe(steps=200))

``setting`` is a ``drpost.world.settings.Setting`` (or a built-in name). Each record is one (setting, method, seed):
target test exact match and loss, general retention, the chosen knob, the Dr weight share by family, wall time.

Protocol (same for every method): the same base model, pool, targets, steps, batch and schedule. The seed draws
the data (``build_setting(setting, seed)``: pool, the 16 target examples, validation and test sets) and the
training randomness. A method with a knob (``METHODS``) is run on the first seed with each knob value; the value
with the best *validation* exact match (ties: lower validation loss) is kept and run on the remaining seeds. The test set is never used to choose anything.

CLI: ``drpost bench quality --paradigm sft`` writes ``results/sft/`` (raw JSON per run, summary.json, README.md
table, PNG plots).
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from drpost.bench.quality_methods import (  # noqa: F401  (re-exported: the method table lives there)
    DEFAULT_METHODS,
    DR_METHODS,
    METHODS,
    SELECTION_BASELINES,
    prefilter_of,
)
from drpost.bench.quality_report import markdown_table, plots, rewrite, summarize, write_results  # noqa: F401
from drpost.bench.stats import best_by_validation
from drpost.trainers.sft import SFTRecipe, encode_examples, train_sft


def _setting(setting):
    from drpost.world.settings import SETTINGS

    return SETTINGS[setting] if isinstance(setting, str) else setting


def _evaluator(tokenizer, data, n_val: int, n_retention: int = 50):
    from drpost.world.evaluate import eval_loss, exact_match

    def final(model) -> dict:
        out = {
            "target_em": exact_match(model, tokenizer, data.target_test),
            "target_loss": eval_loss(model, tokenizer, data.target_test),
            "val_em": exact_match(model, tokenizer, data.target_val[:n_val]),
            "val_loss": eval_loss(model, tokenizer, data.target_val[:n_val]),
        }
        ret = {f: exact_match(model, tokenizer, ex[:n_retention]) for f, ex in data.retention.items()}
        out["retention_em"] = sum(ret.values()) / max(1, len(ret))
        out["retention_by_family"] = ret
        return out

    return final


def offline_selection(name, knob, base, tokenizer, data, g_rows, t_rows, seed, cache):
    """Offline-selected pool indices for DSIR / LESS and the ``<selector>_prefilter_*`` methods: the top ``knob``
    fraction of the **whole** pool for both selectors (LESS scores every pool row; scores cached per seed)."""
    sel = prefilter_of(name)
    if sel is None:
        return None
    k = max(1, int(round(knob * len(g_rows))))
    if sel == "dsir":
        from drpost.baselines.dsir import dsir_select

        return dsir_select(data.general, data.target_train, k, seed=seed)
    from drpost.baselines.less import less_scores, less_select

    key = ("less", seed)
    if key not in cache:  # scored once per seed, shared by every knob value and every LESS-prefiltered method
        t0 = time.perf_counter()
        cache[key] = less_scores(base, tokenizer, g_rows, t_rows, seed=seed)
        cache[("less_seconds", seed)] = time.perf_counter() - t0
    return less_select(cache[key], knob)


def run_one(setting, name: str, knob, seed: int, budget: SFTRecipe, base_size: str = "tiny",
            n_val: int = 100, _ctx: dict | None = None) -> dict:
    """Train and evaluate one (setting, method, knob, seed); returns a flat record."""
    from drpost.world.model import load_base_model
    from drpost.world.settings import build_setting

    setting = _setting(setting)
    ctx = _ctx if _ctx is not None else {}
    if "base" not in ctx:
        ctx["base"], ctx["tok"] = load_base_model(base_size)
        ctx["by_seed"] = {}
    base, tok = ctx["base"], ctx["tok"]
    if seed not in ctx["by_seed"]:  # the seed draws the data (pool, 16 targets, val/test) as well as training
        built = build_setting(setting, seed)
        ctx["by_seed"][seed] = {"data": built, "cache": {},
                                "g_rows": encode_examples(tok, built.general, budget.max_length),
                                "t_rows": encode_examples(tok, built.target_train, budget.max_length)}
    sd = ctx["by_seed"][seed]
    data = sd["data"]
    label, build, _ = METHODS[name]
    spec = build(knob)
    t0 = time.perf_counter()
    selected = offline_selection(name, knob, base, tok, data, sd["g_rows"], sd["t_rows"], seed, sd["cache"])
    recipe = replace(budget, seed=seed)
    metrics = train_sft(copy.deepcopy(base), tok, data.general, data.target_train, spec, recipe,
                        selected=selected, general_rows=sd["g_rows"])
    ev = _evaluator(tok, data, n_val)(metrics.pop("model"))
    return {
        "setting": setting.name, "method": name, "label": label, "knob": knob, "seed": seed,
        **{k: v for k, v in ev.items()},
        "train_loss_curve": _downsample(metrics["train_loss"]),
        "target_loss_curve": _downsample(metrics["target_loss"]),
        "family_weight": metrics["family_weight"],
        "target_family": setting.target_family,
        "skipped_steps": metrics["skipped_steps"],
        "wall_seconds": time.perf_counter() - t0,
        "selection_seconds": sd["cache"].get(("less_seconds", seed)) if prefilter_of(name) == "less" else None,
        "sampler_ms_per_step": 1000 * metrics.get("sampler_seconds", 0.0) / max(1, recipe.steps),
        "step_ms": 1000 * metrics["train_seconds"] / max(1, recipe.steps),
        "budget": asdict(recipe),
    }


def _downsample(xs: list[float], points: int = 50) -> list[float]:
    if len(xs) <= points:
        return xs
    w = len(xs) / points
    return [sum(xs[int(i * w):int((i + 1) * w)]) / max(1, len(xs[int(i * w):int((i + 1) * w)])) for i in range(points)]


def _jobs_worker(args):
    setting, jobs, budget, base_size, n_val, threads, progress = args
    torch.set_num_threads(threads)
    ctx: dict = {}
    out = []
    for name, knob, seed in jobs:
        r = run_one(setting, name, knob, seed, budget, base_size, n_val, ctx)
        if progress:  # one plain line per finished run (workers share the terminal)
            print(f"[bench quality] {r['setting']} {r['label']} knob={knob} seed={seed}: target EM "
                  f"{r['target_em']:.3f}, val EM {r['val_em']:.3f} ({r['wall_seconds']:.0f}s)", flush=True)
        out.append(r)
    return out


def _run_jobs(setting, jobs, budget, base_size, n_val, workers, progress=False):
    if workers <= 1 or len(jobs) <= 1:
        return _jobs_worker((setting, jobs, budget, base_size, n_val, torch.get_num_threads(), progress))
    import multiprocessing as mp

    chunks = [jobs[i::workers] for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        parts = pool.map(_jobs_worker, [(setting, c, budget, base_size, n_val, 1, progress) for c in chunks if c])
    return [r for p in parts for r in p]


def run_quality(setting, methods: list[str] | None = None, seeds: list[int] | None = None,
                budget: SFTRecipe | None = None, base_size: str = "tiny", n_val: int = 100,
                workers: int = 1, progress: bool = False) -> list[dict]:
    """Records of one setting: knobs tuned on validation (first seed), then every method on every seed.

    ``progress`` prints one line per finished run."""
    setting = _setting(setting)
    methods = methods or DEFAULT_METHODS
    seeds = seeds or [0, 1, 2]
    budget = budget or SFTRecipe()
    from drpost.world.model import load_base_model

    load_base_model(base_size)  # build the cache once, before any worker starts
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {sorted(METHODS)}")
    tune_jobs = [(m, k, seeds[0]) for m in methods for k in (METHODS[m][2] or [None])]
    tuned = _run_jobs(setting, tune_jobs, budget, base_size, n_val, workers, progress)
    best = best_by_validation(tuned)
    for r in tuned:
        r["tuning_only"] = r is not best[r["method"]]
    rest = [(m, best[m]["knob"], s) for m in methods for s in seeds[1:]]
    return tuned + _run_jobs(setting, rest, budget, base_size, n_val, workers, progress)


# options of ``drpost bench quality --paradigm sft`` that change the run (the others are refused if set)
READ = frozenset({"paradigm", "output_dir", "steps", "methods", "settings", "seeds", "general_batch_size",
                  "target_batch_size", "optim.lr", "optim.weight_decay", "optim.warmup_ratio", "optim.max_grad_norm",
                  "model.size", "rewrite"})


def run(config) -> dict:
    """CLI entry: ``drpost bench quality --paradigm sft`` (other paradigms: drpost.bench.rl).

    ``config`` is a ``drpost.config.BenchConfig``; options outside ``READ`` that differ from their defaults are
    refused by name (ConfigError).
    """
    if config.paradigm != "sft":
        from drpost.bench.rl import run as run_rl_bench

        return run_rl_bench(config)
    from drpost.config import ConfigError, refuse_unread
    from drpost.world.settings import get_setting

    refuse_unread(config, READ, "bench quality --paradigm sft")
    if config.rewrite:
        old = (Path(config.output_dir) / "README.md").read_text() if (Path(config.output_dir) / "README.md").exists() \
            else ""
        command = next((line.split("`")[1] for line in old.splitlines() if line.startswith("Command: `")),
                       _command())
        table = rewrite(config.output_dir, command)
        print(markdown_table(table, command))
        return table
    settings = list(config.settings)
    for s in settings:
        get_setting(s, option="settings")
    seeds = [int(s) for s in config.seeds]
    methods = list(config.methods)
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"option 'methods': {m!r} is not a method of the SFT benchmark; choose from "
                              f"{', '.join(METHODS)}")
    o = config.optim
    budget = SFTRecipe(steps=config.steps, general_batch_size=config.general_batch_size,
                       target_batch_size=config.target_batch_size, lr=o.lr, weight_decay=o.weight_decay,
                       warmup_ratio=o.warmup_ratio, max_grad_norm=o.max_grad_norm)
    out_dir = config.output_dir
    workers = int(os.environ.get("DRPOST_WORKERS", "2"))
    records = []
    for s in settings:
        records += run_quality(s, methods, seeds, budget, base_size=config.model.size, workers=workers,
                               progress=True)
        write_results(records, out_dir, _command())
    table = write_results(records, out_dir, _command())
    print(markdown_table(table, _command()))
    return table


def _command() -> str:
    import sys

    return "drpost " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("drpost") else "drpost bench quality --paradigm sft"
