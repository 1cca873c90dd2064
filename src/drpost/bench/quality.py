"""Quality benchmark (SFT): settings x methods x seeds on the world, with knobs tuned on a validation split.

Python entry point (what the CLI writes, as records):

    from drpost.bench.quality import run_quality
    records = run_quality(setting, methods=["full_training", "layerwise_subset"], seeds=[0, 1, 2],
                          budget=SFTRecipe(steps=200), out_dir="runs/sft")  # resumable: one JSON per run

``setting`` is a ``drpost.world.settings.Setting`` (or a built-in name). Each record is one (setting, method, seed):
target test exact match and loss, general retention, the chosen knob, the Dr weight share by family, wall time.

Protocol (same for every method): the same base model, pool, targets, steps, batch and schedule. The seed draws
the data (``build_setting(setting, seed)``: pool, the 16 target examples, validation and test sets) and the
training randomness. A method with a knob (``METHODS``) is run on the first seed with each knob value; the value
with the best *validation* exact match (ties: lower validation loss) is kept and run on the remaining seeds. The test set is never used to choose anything.

CLI: ``drpost bench quality --paradigm sft`` writes ``results/sft/`` (raw JSON per run, summary.json, README.md
table, PNG plots). Resumable (``drpost.bench.records``): each run's record is written to ``raw/`` as it finishes and a
re-run skips the runs that have one, so a sweep longer than one sitting finishes across several; LESS's cosines are
kept per (setting, seed, warm-up checkpoint) in ``less/`` (``baselines.less.CheckpointStore``, as ``bench real``).
Workers: ``DRPOST_WORKERS`` processes (default 2), one torch thread each.
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
from drpost.bench.quality_report import (  # noqa: F401
    markdown_table,
    plots,
    records_on_disk,
    rewrite,
    summarize,
    write_results,
)
from drpost.bench.records import mark_tuning, tuned_sweep, write_record
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


def offline_selection(name, knob, base, tokenizer, data, g_rows, t_rows, seed, cache, less_dir=None):
    """Offline-selected pool indices for DSIR / LESS and the ``<selector>_prefilter_*`` methods: the top ``knob``
    fraction of the **whole** pool for both selectors (LESS scores every pool row; scores cached per seed, and with
    ``less_dir`` each finished warm-up checkpoint's cosines kept on disk there: ``baselines.less.CheckpointStore``)."""
    sel = prefilter_of(name)
    if sel is None:
        return None
    k = max(1, int(round(knob * len(g_rows))))
    if sel == "dsir":
        from drpost.baselines.dsir import dsir_select

        return dsir_select(data.general, data.target_train, k, seed=seed)
    from drpost.baselines.less import CheckpointStore, less_scores, less_select

    key = ("less", seed)
    if key not in cache:  # scored once per seed, shared by every knob value and every LESS-prefiltered method
        t0 = time.perf_counter()
        store = None if less_dir is None else CheckpointStore(less_dir, f"{data.setting.name}__s{seed}")
        cache[key] = less_scores(base, tokenizer, g_rows, t_rows, seed=seed, store=store)
        measured = None if store is None else store.seconds()  # as each checkpoint was scored (resumed or not)
        cache[("less_seconds", seed)] = measured or time.perf_counter() - t0
    return less_select(cache[key], knob)


def run_one(setting, name: str, knob, seed: int, budget: SFTRecipe, base_size: str = "tiny",
            n_val: int = 100, _ctx: dict | None = None) -> dict:
    """Train and evaluate one (setting, method, knob, seed); returns a flat record. ``_ctx`` keeps the base model
    and each (setting, seed)'s data between calls; with ``_ctx["less_dir"]`` set, LESS's cosines (the costly part:
    4 warm-up checkpoints x every pool row) are kept on disk there per (setting, seed, checkpoint), checked against
    the data and settings that made them (``baselines.less.CheckpointStore``), and shared by every LESS run."""
    from drpost.world.model import load_base_model
    from drpost.world.settings import build_setting

    setting = _setting(setting)
    ctx = _ctx if _ctx is not None else {}
    if "base" not in ctx:
        ctx["base"], ctx["tok"] = load_base_model(base_size)
        ctx["by_seed"] = {}
    base, tok = ctx["base"], ctx["tok"]
    key = (setting.name, seed)
    if key not in ctx["by_seed"]:  # the seed draws the data (pool, 16 targets, val/test) as well as training
        built = build_setting(setting, seed)
        ctx["by_seed"][key] = {"data": built, "cache": {},
                               "g_rows": encode_examples(tok, built.general, budget.max_length),
                               "t_rows": encode_examples(tok, built.target_train, budget.max_length)}
    sd = ctx["by_seed"][key]
    data = sd["data"]
    label, build, _ = METHODS[name]
    spec = build(knob)
    t0 = time.perf_counter()
    selected = offline_selection(name, knob, base, tok, data, sd["g_rows"], sd["t_rows"], seed, sd["cache"],
                                 ctx.get("less_dir"))
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


_CTX: dict = {}  # this process's base model and data (run_one's _ctx), kept across tasks


def _task(args) -> list[dict]:
    """Run one task (jobs that share the costly LESS scores, or a single job), writing each record as it
    finishes."""
    jobs, settings, budget, base_size, n_val, out_dir, threads = args
    torch.set_num_threads(threads)
    _CTX["less_dir"] = str(Path(out_dir) / "less")
    out = []
    for setting, name, knob, seed in jobs:
        r = run_one(settings[setting], name, knob, seed, budget, base_size, n_val, _CTX)
        write_record(out_dir, r)
        print(f"[bench quality] {r['setting']} {r['label']} knob={knob} seed={seed}: target EM "
              f"{r['target_em']:.3f}, val EM {r['val_em']:.3f}, retention {r['retention_em']:.3f} "
              f"({r['wall_seconds']:.0f}s)", flush=True)
        out.append(r)
    return out


def run_jobs(jobs: list[tuple], settings: dict, out_dir: str | Path, budget: SFTRecipe, base_size: str = "tiny",
             n_val: int = 100, workers: int = 1) -> None:
    """Run ``jobs`` ((setting name, method, knob, seed)), each record written to ``out_dir/raw`` as it finishes;
    ``workers`` processes with one torch thread each (or this process). The LESS runs of one (setting, seed) form one
    task, so that one process scores the pool for them (and caches the scores on disk)."""
    less = {}
    tasks = []
    for j in jobs:
        if prefilter_of(j[1]) == "less":
            less.setdefault((j[0], j[3]), []).append(j)
        else:
            tasks.append([j])
    tasks = list(less.values()) + tasks  # the long LESS tasks first
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            _task((t, settings, budget, base_size, n_val, str(out_dir), torch.get_num_threads()))
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
        args = [(t, settings, budget, base_size, n_val, str(out_dir), 1) for t in tasks]
        for _ in pool.imap_unordered(_task, args):
            pass


def knob_values(name: str) -> list:
    return METHODS[name][2] or [None]


def run_quality(setting, methods: list[str] | None = None, seeds: list[int] | None = None,
                budget: SFTRecipe | None = None, base_size: str = "tiny", n_val: int = 100,
                workers: int = 1, out_dir: str | Path | None = None) -> list[dict]:
    """Records of one setting: knobs tuned on validation (first seed), then every method on every seed.

    Resumable: each run's record goes to ``out_dir/raw`` as it finishes, and runs whose record exists are skipped
    (``drpost.bench.records.tuned_sweep``); without ``out_dir`` the records go to a temporary directory."""
    import tempfile

    setting = _setting(setting)
    methods = methods or DEFAULT_METHODS
    seeds = seeds or [0, 1, 2]
    budget = budget or SFTRecipe()
    from drpost.world.model import load_base_model

    load_base_model(base_size)  # build the cache once, before any worker starts
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {sorted(METHODS)}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(out_dir) if out_dir is not None else Path(tmp)
        records = tuned_sweep([setting.name], methods, seeds, out, knob_values,
                              lambda jobs: run_jobs(jobs, {setting.name: setting}, out, budget, base_size, n_val,
                                                    workers))
    return mark_tuning(records)


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
    from drpost.bench.records import claim_dir
    from drpost.config import ConfigError, command_of, refuse_unread, save_resolved
    from drpost.world.settings import get_setting

    refuse_unread(config, READ, "bench quality --paradigm sft")
    if config.rewrite:  # rebuilds the tables only; an existing config.yaml stays as it is
        if not (Path(config.output_dir) / "config.yaml").exists():
            save_resolved(config, config.output_dir)
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
    # a directory with records keeps their recipe, and its config.yaml lists every run on disk (``merged``); the
    # tables show every record there, named by this command line where it covers them all, else by that file
    merged, covered = claim_dir(config, out_dir, {"output_dir", "rewrite"})
    command = _command() if covered else f"drpost {command_of(config)} --config {Path(out_dir) / 'config.yaml'}"
    workers = int(os.environ.get("DRPOST_WORKERS", "2"))
    for s in settings:  # tables rewritten after each setting; a re-run skips the finished runs
        run_quality(s, methods, seeds, budget, base_size=config.model.size, workers=workers, out_dir=out_dir)
        table = write_results(records_on_disk(out_dir, list(merged.settings)), out_dir, command)
    print(markdown_table(table, command))
    return table


def _command() -> str:
    import sys

    return "drpost " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("drpost") else "drpost bench quality --paradigm sft"
