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
import json
import math
import os
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from drpost.bench.stats import mean_se
from drpost.trainers.sft import MethodSpec, SFTRecipe, encode_examples, train_sft

# name -> (label, spec builder(knob) , knob values or None)
METHODS: dict[str, tuple[str, callable, list | None]] = {
    "full_training": ("FullTraining", lambda k: MethodSpec("FullTraining", "full_training"), None),
    "target_only": ("Target-only", lambda k: MethodSpec("Target-only", "target_only"), None),
    "mixing": ("Mixing", lambda k: MethodSpec("Mixing", "full_training", sampler="mixing",
                                              sampler_options={"target_prob": k}), [0.05, 0.2]),
    "random_subset": ("Random", lambda k: MethodSpec("Random", "full_training", sampler="random_subset",
                                                     sampler_options={"frac": 0.5}), None),
    "dsir": ("DSIR", lambda k: MethodSpec("DSIR", "full_training", sampler="selected",
                                          sampler_options={"select_frac": k}), [0.02, 0.1]),
    "less": ("LESS", lambda k: MethodSpec("LESS", "full_training", sampler="selected",
                                          sampler_options={"select_frac": k}), [0.02, 0.1]),
    "greats": ("GREATS", lambda k: MethodSpec("GREATS", "global_subset",
                                              {"selection": "greedy", "frac": 0.5, "scoring": "auto"},
                                              sampler="candidates", loss="sample_mean", target_batch_size=2), None),
    "global_subset": ("GlobalSubset", lambda k: MethodSpec("GlobalSubset", "global_subset", {"frac": k}),
                      [0.25, 0.5]),
    "layerwise_subset": ("LayerWiseSubset", lambda k: MethodSpec("LayerWiseSubset", "layerwise_subset",
                                                                 {"frac": k}), [0.25, 0.5]),
    "hull": ("Hull", lambda k: MethodSpec("Hull", "hull"), None),
    "capped_simplex": ("CappedSimplex", lambda k: MethodSpec("CappedSimplex", "capped_simplex", {"k": k}), [2, 4]),
    "ball_auto": ("Ball(auto)", lambda k: MethodSpec("Ball(auto)", "ball", {"radius": "auto"}), None),
    "gem": ("GEM", lambda k: MethodSpec("GEM", "gem"), None),
    "layerwise_hull_slack": ("LayerHull+slack(auto)",
                             lambda k: MethodSpec("LayerHull+slack(auto)", "hull", {"scope": "layer", "slack": "auto"}),
                             None),
    "cone": ("Cone", lambda k: MethodSpec("Cone", "cone"), None),
    "span": ("Span", lambda k: MethodSpec("Span", "span"), None),
    "halfspace": ("Halfspace", lambda k: MethodSpec("Halfspace", "halfspace"), None),
}
# LESS computes a per-example gradient for every candidate; on 2 CPU cores it scores a fixed random 4,000-example
# slice of the pool (its warm-up also draws from that slice), and keeps the top fraction of the slice.
LESS_CANDIDATES = 4000
DR_METHODS = {"global_subset", "layerwise_subset", "hull", "capped_simplex", "ball_auto", "gem", "layerwise_hull_slack"}
SELECTION_BASELINES = {"dsir", "less", "greats", "random_subset"}
DEFAULT_METHODS = ["full_training", "target_only", "mixing", "random_subset", "dsir", "less", "greats", "global_subset",
                   "layerwise_subset", "hull", "capped_simplex", "ball_auto", "gem", "layerwise_hull_slack"]


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


def _selection(name, knob, base, tokenizer, data, g_rows, t_rows, seed, cache):
    """Offline-selected pool indices for DSIR / LESS (scores cached per setting and seed)."""
    if name == "dsir":
        from drpost.baselines.dsir import dsir_select

        return dsir_select(data.general, data.target_train, max(1, int(knob * len(data.general))), seed=seed)
    if name == "less":
        from drpost.baselines.less import less_scores, less_select

        key = ("less", seed)
        if key not in cache:  # scored once per seed, shared by every knob value
            cand = random.Random(f"less-{seed}").sample(range(len(g_rows)), min(LESS_CANDIDATES, len(g_rows)))
            scores = less_scores(base, tokenizer, [g_rows[i] for i in cand], t_rows, seed=seed)
            cache[key] = (cand, scores)
        cand, scores = cache[key]
        return [cand[i] for i in less_select(scores, knob)]
    return None


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
    selected = _selection(name, knob, base, tok, data, sd["g_rows"], sd["t_rows"], seed, sd["cache"])
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
    best: dict[str, dict] = {}
    for r in tuned:
        cur = best.get(r["method"])
        if cur is None or (r["val_em"], -r["val_loss"]) > (cur["val_em"], -cur["val_loss"]):
            best[r["method"]] = r
    for r in tuned:
        r["tuning_only"] = r is not best[r["method"]]
    rest = [(m, best[m]["knob"], s) for m in methods for s in seeds[1:]]
    return tuned + _run_jobs(setting, rest, budget, base_size, n_val, workers, progress)


# --------------------------------------------------------------------------- reporting
def summarize(records: list[dict]) -> dict:
    """{setting: {method: {metric: (mean, se), knob, n}}} over the non-tuning records."""
    out: dict = {}
    for r in records:
        if r.get("tuning_only"):
            continue
        out.setdefault(r["setting"], {}).setdefault(r["method"], []).append(r)
    table = {}
    for s, by in out.items():
        table[s] = {}
        for m, rs in by.items():
            table[s][m] = {k: mean_se([r[k] for r in rs]) for k in ("target_em", "target_loss", "retention_em")}
            table[s][m]["knob"] = rs[0]["knob"]
            table[s][m]["n"] = len(rs)
            table[s][m]["label"] = rs[0]["label"]
            table[s][m]["wall_seconds"] = sum(r["wall_seconds"] for r in rs) / len(rs)
            fw = [r["family_weight"].get(r["target_family"], 0.0) for r in rs if r["family_weight"]]
            table[s][m]["target_family_weight"] = sum(fw) / len(fw) if fw else None
    return table


def _pm(mean_and_se: tuple[float, float]) -> str:
    """'0.123 ± 0.004' (mean ± standard error), or just the mean for a single seed."""
    mu, se = mean_and_se
    return f"{mu:.3f}" if math.isnan(se) else f"{mu:.3f} ± {se:.3f}"


def markdown_table(table: dict, command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    for s, by in table.items():
        best_em = max(v["target_em"][0] for v in by.values())
        sel_best = max((v["target_em"][0] for m, v in by.items() if m in SELECTION_BASELINES), default=None)
        lines += [f"### {s}", "",
                  "| method | knob | target EM | target loss | retention EM | weight on target family | s/run |",
                  "|---|---|---|---|---|---|---|"]
        for v in by.values():
            em = v["target_em"][0]
            mark = " **best**" if em == best_em else ""
            tfw = "" if v["target_family_weight"] is None else f"{v['target_family_weight']:.2f}"
            lines.append(f"| {v['label']} | {v['knob'] if v['knob'] is not None else ''} "
                         f"| {_pm(v['target_em'])}{mark} | {_pm(v['target_loss'])} | {_pm(v['retention_em'])} "
                         f"| {tfw} | {v['wall_seconds']:.0f} |")
        dr = {m: v["target_em"][0] for m, v in by.items() if m in DR_METHODS}
        if dr and sel_best is not None:
            bm = max(dr, key=dr.get)
            verdict = "beats" if dr[bm] > sel_best else "does not beat"
            lines += ["", f"Best Dr method: {by[bm]['label']} ({dr[bm]:.3f}) {verdict} the best data-selection "
                          f"baseline ({sel_best:.3f})."]
        lines.append("")
    return "\n".join(lines)


def plots(records: list[dict], table: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(table)
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    for ax, s in zip(axes[0], settings):
        by = table[s]
        names = list(by)
        ax.bar(range(len(names)), [by[m]["target_em"][0] for m in names],
               yerr=[0 if math.isnan(by[m]["target_em"][1]) else by[m]["target_em"][1] for m in names],
               color=["tab:green" if m in DR_METHODS else "tab:gray" for m in names], capsize=3)
        ax.set_xticks(range(len(names)), [by[m]["label"] for m in names], rotation=60, ha="right", fontsize=8)
        ax.set_title(s)
        ax.set_ylabel("target test exact match")
    fig.tight_layout()
    fig.savefig(out / "methods.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, s in zip(axes[0], settings):
        for m in table[s]:
            curves = [r["target_loss_curve"] for r in records if r["setting"] == s and r["method"] == m
                      and not r.get("tuning_only")]
            if curves:
                L = min(len(c) for c in curves)
                ax.plot([sum(c[i] for c in curves) / len(curves) for i in range(L)], label=table[s][m]["label"])
        ax.set_title(f"{s}: target-batch loss during training")
        ax.set_xlabel("training progress (50 bins)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, s in zip(axes[0], settings):
        ms = [m for m in table[s] if table[s][m]["target_family_weight"] is not None]
        ax.bar(range(len(ms)), [table[s][m]["target_family_weight"] for m in ms])
        ax.set_xticks(range(len(ms)), [table[s][m]["label"] for m in ms], rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{s}: share of update weight on the target family")
    fig.tight_layout()
    fig.savefig(out / "weight_share.png", dpi=110)
    plt.close(fig)

    # bias-variance: validation metric as regularization strength varies (tuning sweeps, seed 0)
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, s in zip(axes[0], settings):
        for m in ("global_subset", "layerwise_subset", "capped_simplex"):
            pts = sorted((r["knob"], r["val_em"], r["val_loss"]) for r in records
                         if r["setting"] == s and r["method"] == m and r["seed"] == records[0]["seed"]
                         and r["knob"] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{METHODS[m][0]} (val EM)")
        for m, style in (("full_training", "--"), ("target_only", ":")):
            v = [r["val_em"] for r in records if r["setting"] == s and r["method"] == m]
            if v:
                ax.axhline(sum(v) / len(v), ls=style, color="k", label=METHODS[m][0])
        ax.set_xlabel("knob (frac of batch kept / k): larger = weaker selection")
        ax.set_title(f"{s}: strength sweep")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "strength.png", dpi=110)
    plt.close(fig)


def write_results(records: list[dict], out_dir: str | Path, command: str) -> dict:
    out = Path(out_dir)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    for r in records:
        name = f"{r['setting']}__{r['method']}__k{r['knob']}__s{r['seed']}.json"
        (out / "raw" / name).write_text(json.dumps(r, indent=1))
    (out / "summary.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if not k.endswith("_curve")} for r in records], indent=1))
    table = summarize(records)
    (out / "README.md").write_text("# SFT quality results\n\n" + markdown_table(table, command) + "\n")
    plots(records, table, out)
    return table


def rewrite(out_dir: str | Path, command: str) -> dict:
    """Rebuild summary.json, README.md and the plots of ``out_dir`` from its raw per-run JSON records."""
    out = Path(out_dir)
    order = json.loads((out / "summary.json").read_text())  # the run's record order (tables follow it)
    records = [json.loads((out / "raw" / f"{r['setting']}__{r['method']}__k{r['knob']}__s{r['seed']}.json")
                          .read_text()) for r in order]
    return write_results(records, out_dir, command)


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
