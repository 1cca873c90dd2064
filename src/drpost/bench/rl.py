"""Quality benchmark for the preference / RL paradigms: RLHF (PPO), RLVR (GRPO) and DPO on the world's RL settings.

Python entry point (one for all three paradigms):

    from drpost.bench.rl import run_rl, write_rl_results
    records = run_rl("rlvr", methods=["full_training", "layerwise_subset"], seeds=[0, 1, 2], budget=None)
    write_rl_results(records, "results/rlvr", command="...")

``setting`` defaults to the paradigm's built-in setting (``drpost.world.rl_settings``: ``rlhf_format``,
``rlvr_arith``, ``dpo_pairs``); ``budget`` is the paradigm's recipe (``RLHFRecipe`` / ``RLVRRecipe`` /
``DPORecipe``; ``BUDGETS`` holds the defaults sized for about 10-15 minutes per paradigm on two CPU cores). Each
record is one (setting, method, seed): the target metric (RLHF: reward-model score of sampled responses on held-out
target prompts; RLVR: verifier accuracy of sampled responses (the quantity GRPO optimizes) on held-out target
prompts; DPO: greedy exact match on held-out target prompts), KL to the reference, general retention,
the training curve of the target reward, wall time. A ``base`` record (the untrained model, on seed 0's data) is
added per setting.

Protocol: the seed draws the data -- general prompts / pairs, the 16 targets, the test prompts and the retention
sets (``build_rl_setting(setting, seed)``, as ``drpost.bench.quality`` does for SFT) -- as well as training; the
RLHF reward model is the setting's one, trained once on seed 0's preference pairs (the judge, not the data).
Within a seed every method gets the same base model, prompts, rollout budget, optimizer and schedule; knobs are fixed
in advance (subsets keep half the batch in RLHF and DPO, as the paper's SFT default; RLVR filters negative scores,
``frac=1``, as the paper's RLVR runs); no tuning on the test prompts.

CLI: ``drpost bench quality --paradigm rlhf|rlvr|dpo`` writes ``results/<paradigm>/`` (raw JSON per run,
``summary.json``, ``README.md``, PNG plots). Threads: one per worker process (``DRPOST_WORKERS``, default 2).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from drpost.bench.stats import mean_se, pm
from drpost.trainers.dpo import DPORecipe
from drpost.trainers.rlhf import RLHFRecipe, RLMethod
from drpost.trainers.rlvr import RLVRRecipe
from drpost.world.rl_settings import DEFAULT_SETTINGS

PARADIGMS = ("rlhf", "rlvr", "dpo")

_TOPK = {"frac": 0.5}
_FILTER = {"selection": "filter", "frac": 1.0}
# paradigm -> method name -> (label, RLMethod)
METHODS: dict[str, dict[str, tuple[str, RLMethod]]] = {
    "rlhf": {
        "full_training": ("FullTraining", RLMethod("FullTraining", "full_training")),
        "iif": ("IIF", RLMethod("IIF", baseline="iif")),
        "global_subset": ("GlobalSubset", RLMethod("GlobalSubset", "global_subset", _TOPK)),
        "layerwise_subset": ("LayerWiseSubset", RLMethod("LayerWiseSubset", "layerwise_subset", _TOPK)),
        "hull": ("Hull", RLMethod("Hull", "hull")),
        "ball_auto": ("Ball(auto)", RLMethod("Ball(auto)", "ball", {"radius": "auto"})),
        "target_only": ("Target-only", RLMethod("Target-only", "target_only")),
    },
    "rlvr": {
        "full_training": ("FullTraining", RLMethod("FullTraining", "full_training")),
        "global_subset": ("GlobalSubset", RLMethod("GlobalSubset", "global_subset", _FILTER)),
        "layerwise_subset": ("LayerWiseSubset", RLMethod("LayerWiseSubset", "layerwise_subset", _FILTER)),
        "hull": ("Hull", RLMethod("Hull", "hull")),
        "ball_auto": ("Ball(auto)", RLMethod("Ball(auto)", "ball", {"radius": "auto"})),
        "target_only": ("Target-only", RLMethod("Target-only", "target_only")),
    },
    "dpo": {
        "full_training": ("FullTraining", RLMethod("FullTraining", "full_training")),
        "target_only": ("Target-only", RLMethod("Target-only", "target_only")),
        "global_subset": ("GlobalSubset", RLMethod("GlobalSubset", "global_subset", _TOPK)),
        "layerwise_subset": ("LayerWiseSubset", RLMethod("LayerWiseSubset", "layerwise_subset", _TOPK)),
        "hull": ("Hull", RLMethod("Hull", "hull")),
        "ball_auto": ("Ball(auto)", RLMethod("Ball(auto)", "ball", {"radius": "auto"})),
        "layerwise_hull_slack": ("LayerHull+slack(auto)",
                                 RLMethod("LayerHull+slack(auto)", "hull", {"scope": "layer", "slack": "auto"})),
    },
}
DEFAULT_METHODS = {
    "rlhf": ["full_training", "iif", "global_subset", "layerwise_subset", "hull"],
    "rlvr": ["full_training", "global_subset", "layerwise_subset", "hull"],
    "dpo": ["full_training", "target_only", "global_subset", "layerwise_subset", "hull"],
}
DR_METHODS = {"global_subset", "layerwise_subset", "hull", "ball_auto", "layerwise_hull_slack"}
BUDGETS = {
    "rlhf": RLHFRecipe(rounds=12, rollout_batch_size=32, target_rollouts=16, mini_batch_size=8, target_batch_size=8,
                       ppo_epochs=2, lr=3e-4, value_lr=1e-3, kl_coef=0.05, max_new_tokens=8),
    "rlvr": RLVRRecipe(steps=60, prompts_per_step=4, target_prompts=2, group_size=8, lr=2e-4, max_new_tokens=6),
    "dpo": DPORecipe(steps=100, general_batch_size=8, target_batch_size=2, lr=1e-4, beta=0.1),
}
METRIC_NAMES = {"rlhf": "target reward (RM, sampled)", "rlvr": "target accuracy (sampled)",
                "dpo": "target accuracy (greedy)"}
N_TEST = 200


def _context(paradigm: str, setting: str, base_size: str) -> dict:
    from drpost.world.evaluate import check
    from drpost.world.model import load_base_model

    base, tok = load_base_model(base_size)
    ctx = {"base": base, "tok": tok, "by_seed": {}}
    if paradigm == "rlhf":
        from drpost.trainers.rlhf import rm_reward_fn
        from drpost.world.reward_model import world_reward_model

        rm, info = world_reward_model(setting, base_size)
        ctx["reward_fn"], ctx["rm_info"] = rm_reward_fn(rm), {k: v for k, v in info.items() if k != "loss_curve"}
    else:
        from drpost.trainers.rl_common import check_reward_fn

        ctx["reward_fn"] = check_reward_fn(tok, check)
    return ctx


def seed_data(ctx: dict, setting: str, seed: int):
    """The setting's data drawn from ``seed`` (``RLSettingData``), built once per seed and kept in ``ctx``."""
    from drpost.world.rl_settings import build_rl_setting

    by_seed = ctx.setdefault("by_seed", {})
    if seed not in by_seed:
        by_seed[seed] = build_rl_setting(setting, seed)
    return by_seed[seed]


def _evaluate(paradigm: str, ctx: dict, data, model, budget) -> dict:
    from drpost.trainers.dpo import pair_accuracy
    from drpost.trainers.rl_common import evaluate_policy
    from drpost.world.evaluate import check, retention_exact_match

    tok = ctx["tok"]
    test = data.target_test[:N_TEST]
    max_new = getattr(budget, "max_new_tokens", 8)
    ev = evaluate_policy(model, ctx["base"], tok, test, ctx["reward_fn"], max_new,
                         lambda m: retention_exact_match(m, tok, data.retention), check=check)
    ev["target_metric"] = ev["em"] if paradigm == "dpo" else ev["sampled_reward"]
    if paradigm == "dpo":
        ev["pair_accuracy"] = pair_accuracy(model, ctx["base"], tok, test)
    return ev


def run_one(paradigm: str, setting: str, name: str, seed: int, budget, base_size: str = "tiny",
            _ctx: dict | None = None) -> dict:
    """Train and evaluate one (setting, method, seed); ``name="base"`` evaluates the untrained model."""
    from drpost.trainers.dpo import train_dpo
    from drpost.trainers.rlhf import train_rlhf
    from drpost.trainers.rlvr import train_rlvr

    ctx = _ctx if _ctx is not None else {}
    if not ctx:
        ctx.update(_context(paradigm, setting, base_size))
    base, tok = ctx["base"], ctx["tok"]
    data = seed_data(ctx, setting, seed)  # the seed draws the data as well as training
    t0 = time.perf_counter()
    curve: list[float] = []
    extra: dict = {}
    if name == "base":
        label, model = "Base model", base
    else:
        label, spec = METHODS[paradigm][name]
        recipe = replace(budget, seed=seed)
        policy = copy.deepcopy(base)
        if paradigm == "rlhf":
            m = train_rlhf(policy, copy.deepcopy(base), ctx["reward_fn"], tok, data.general, data.target_train, spec,
                           recipe)
            curve = [r["target_score"] for r in m["rounds"]]
            iif = spec.baseline == "iif"  # IIF's kept share of each round; subsets keep frac by construction
            extra = {"kept_frac": sum(r["kept_frac"] for r in m["rounds"]) / len(m["rounds"]) if iif else None,
                     "general_score_curve": [r["general_score"] for r in m["rounds"]]}
        elif paradigm == "rlvr":
            m = train_rlvr(policy, copy.deepcopy(base), ctx["reward_fn"], tok, data.general, data.target_train, spec,
                           recipe)
            curve = [r["target_reward"] for r in m["steps"]]
            kf = [r["kept_frac"] for r in m["steps"] if r["kept_frac"] is not None]
            extra = {"kept_frac": sum(kf) / len(kf) if kf else None,
                     "general_score_curve": [r["general_reward"] for r in m["steps"]]}
        else:
            m = train_dpo(policy, copy.deepcopy(base), tok, data.general, data.target_train, spec, recipe)
            curve = m["target_loss"]
            fw = m["flipped_weight"]
            extra = {"flipped_weight": sum(fw) / len(fw) if fw else None}
        model = m["model"]
        extra["skipped_steps"] = m["skipped_steps"]
    ev = _evaluate(paradigm, ctx, data, model, budget)
    return {"paradigm": paradigm, "setting": data.setting.name, "method": name, "label": label, "seed": seed,
            **{k: v for k, v in ev.items()}, "curve": _downsample(curve), **extra,
            "wall_seconds": time.perf_counter() - t0, "budget": asdict(budget) if name != "base" else None}


def _downsample(xs: list[float], points: int = 40) -> list[float]:
    if len(xs) <= points:
        return list(xs)
    w = len(xs) / points
    return [sum(xs[int(i * w):int((i + 1) * w)]) / max(1, len(xs[int(i * w):int((i + 1) * w)])) for i in range(points)]


def _worker(args):
    paradigm, setting, jobs, budget, base_size, progress = args
    torch.set_num_threads(1)
    ctx: dict = {}
    out = []
    for name, seed in jobs:
        r = run_one(paradigm, setting, name, seed, budget, base_size, ctx)
        if progress:  # one plain line per finished run (workers share the terminal)
            print(f"[bench {paradigm}] {setting} {name} seed={seed}: target metric {r['target_metric']:.3f}", flush=True)
        out.append(r)
    return out


def run_rl(paradigm: str, setting: str | None = None, methods: list[str] | None = None,
           seeds: list[int] | None = None, budget=None, base_size: str = "tiny", workers: int = 1,
           progress: bool = False) -> list[dict]:
    """Records of every (method, seed) on one setting of ``paradigm``, plus one ``base`` record (``progress``
    prints one line per finished run)."""
    if paradigm not in PARADIGMS:
        raise ValueError(f"unknown paradigm {paradigm!r}; choose from {PARADIGMS}")
    setting = setting or DEFAULT_SETTINGS[paradigm]
    methods = methods or DEFAULT_METHODS[paradigm]
    seeds = list(seeds) if seeds is not None else [0, 1, 2]
    budget = budget or BUDGETS[paradigm]
    for m in methods:
        if m not in METHODS[paradigm]:
            raise ValueError(f"method {m!r} is not available for {paradigm}; choose from {sorted(METHODS[paradigm])}")
    _context(paradigm, setting, base_size)  # build caches (base model, reward model) before workers start
    jobs = [("base", 0)] + [(m, s) for s in seeds for m in methods]
    if workers <= 1:
        return _worker((paradigm, setting, jobs, budget, base_size, progress))
    import multiprocessing as mp

    chunks = [jobs[i::workers] for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        parts = pool.map(_worker, [(paradigm, setting, c, budget, base_size, progress) for c in chunks if c])
    order = {j: i for i, j in enumerate(jobs)}
    return sorted((r for p in parts for r in p), key=lambda r: order[(r["method"], r["seed"])])


# --------------------------------------------------------------------------- reporting
def summarize_rl(records: list[dict]) -> dict:
    """{method: {metric: (mean, se), label, n, wall_seconds}} over the records of one setting."""
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["method"], []).append(r)
    out = {}
    for m, rs in by.items():
        row = {k: mean_se([r[k] for r in rs]) for k in ("target_metric", "em", "reward", "sampled_reward", "kl",
                                                       "retention_em")}
        if "pair_accuracy" in rs[0]:
            row["pair_accuracy"] = mean_se([r["pair_accuracy"] for r in rs])
        row.update(label=rs[0]["label"], n=len(rs), wall_seconds=sum(r["wall_seconds"] for r in rs) / len(rs))
        kf = [r.get("kept_frac") for r in rs if r.get("kept_frac") is not None]
        row["kept_frac"] = sum(kf) / len(kf) if kf else None
        fw = [r.get("flipped_weight") for r in rs if r.get("flipped_weight") is not None]
        row["flipped_weight"] = sum(fw) / len(fw) if fw else None
        out[m] = row
    return out


def markdown_rl(paradigm: str, records: list[dict], command: str, notes: str = "") -> str:
    table = summarize_rl(records)
    setting = records[0]["setting"]
    metric = METRIC_NAMES[paradigm]
    trained = {m: v for m, v in table.items() if m != "base"}
    best = max(v["target_metric"][0] for v in trained.values())
    extra_h = " pair acc. |" if paradigm == "dpo" else ""
    lines = [f"# {paradigm.upper()} quality results", "", f"Command: `{command}`", "",
             f"Setting `{setting}`; {len(trained)} methods x {max(v['n'] for v in trained.values())} seeds, same "
             f"budget for all; mean ± s.e. over seeds. Best target metric in **bold**.", "",
             f"| method | {metric} | target EM (greedy) | target reward (greedy) | KL to ref | general retention EM |"
             f"{extra_h} kept frac | s/run |",
             "|---|---|---|---|---|---|" + ("---|" if paradigm == "dpo" else "") + "---|---|"]
    for m, v in table.items():
        tm = pm(v["target_metric"])
        if m != "base" and v["target_metric"][0] == best:
            tm = f"**{tm}**"
        kf = "" if v["kept_frac"] is None else f"{v['kept_frac']:.2f}"
        pa = f" {pm(v['pair_accuracy'])} |" if paradigm == "dpo" else ""
        lines.append(f"| {v['label']} | {tm} | {pm(v['em'])} | {pm(v['reward'])} | {pm(v['kl'])} "
                     f"| {pm(v['retention_em'])} |{pa} {kf} | {v['wall_seconds']:.0f} |")
    full = trained.get("full_training", {}).get("target_metric", (math.nan,))[0]
    dr = {m: v["target_metric"][0] for m, v in trained.items() if m in DR_METHODS}
    if dr:
        bm = max(dr, key=dr.get)
        rivals = {m: trained[m]["target_metric"][0] for m in ("full_training", "iif") if m in trained}
        verdict = ", ".join(f"{'ahead of' if dr[bm] > v else 'not ahead of'} {trained[m]['label']} ({v:.3f})"
                            for m, v in rivals.items())
        lines += ["", f"Best Dr method: {trained[bm]['label']} ({dr[bm]:.3f}): {verdict}. FullTraining: {full:.3f}."]
    if notes:
        lines += ["", notes]
    return "\n".join(lines) + "\n"


def plots_rl(paradigm: str, records: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarize_rl(records)
    names = [m for m in table if m != "base"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title in zip(axes, ("target_metric", "kl", "retention_em"),
                              (METRIC_NAMES[paradigm], "KL to reference (nats/sequence)", "general retention EM")):
        ys = [table[m][key][0] for m in names]
        es = [0 if math.isnan(table[m][key][1]) else table[m][key][1] for m in names]
        ax.bar(range(len(names)), ys, yerr=es, capsize=3,
               color=["tab:green" if m in DR_METHODS else "tab:gray" for m in names])
        if "base" in table:
            ax.axhline(table["base"][key][0], ls=":", color="k", label="base model")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(names)), [table[m]["label"] for m in names], rotation=40, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "methods.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in names:
        curves = [r["curve"] for r in records if r["method"] == m and r["curve"]]
        if not curves:
            continue
        L = min(len(c) for c in curves)
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(L)]
        k = max(1, L // 10)  # running mean for readability
        smooth = [sum(mean[max(0, i - k + 1):i + 1]) / len(mean[max(0, i - k + 1):i + 1]) for i in range(L)]
        ax.plot(smooth, label=table[m]["label"])
    ax.set_xlabel("round" if paradigm == "rlhf" else "training progress (steps in 40 bins)")
    ax.set_ylabel({"rlhf": "target rollouts' mean RM score", "rlvr": "target rollouts' mean reward",
                   "dpo": "target-batch DPO loss"}[paradigm])
    ax.set_title(f"{paradigm.upper()}: training curves (mean over seeds, running mean)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def write_rl_results(paradigm: str, records: list[dict], out_dir: str | Path, command: str, notes: str = "") -> dict:
    out = Path(out_dir)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    for r in records:
        (out / "raw" / f"{r['setting']}__{r['method']}__s{r['seed']}.json").write_text(json.dumps(r, indent=1))
    (out / "summary.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if not k.endswith("curve")} for r in records], indent=1))
    (out / "README.md").write_text(markdown_rl(paradigm, records, command, notes))
    plots_rl(paradigm, records, out)
    return summarize_rl(records)


def rewrite(out_dir: str | Path, paradigm: str, notes: str | None = None) -> dict:
    """Rebuild summary.json, README.md and plots of ``out_dir`` from its raw/*.json records (command kept).

    ``notes``: markdown after the table; None keeps the old README's notes (what follows its "Best Dr method" line).
    CLI: ``drpost bench quality --paradigm <paradigm> rewrite=true output_dir=<out_dir>``.
    """
    out = Path(out_dir)
    records = [json.loads(p.read_text()) for p in sorted((out / "raw").glob("*.json"))]
    order = ["base"] + list(METHODS[paradigm])
    records.sort(key=lambda r: (order.index(r["method"]), r["seed"]))
    if paradigm == "rlhf":
        for r in records:
            if r["method"] != "iif":
                r["kept_frac"] = None
    old = (out / "README.md").read_text() if (out / "README.md").exists() else ""
    command = next((line.split("`")[1] for line in old.splitlines() if line.startswith("Command: `")),
                   f"drpost bench quality --paradigm {paradigm}")
    if notes is None:
        lines = old.splitlines()
        at = next((i for i, line in enumerate(lines) if line.startswith("Best Dr method:")), None)
        notes = "\n".join(lines[at + 1:]).strip() if at is not None else ""
    table = write_rl_results(paradigm, records, out, command, notes)
    head = old.split("\n# ", 1)[0] if "\n# " in old and not old.startswith("# ") else ""
    if head.strip():  # a note above the title (e.g. how old the tables are) is kept
        (out / "README.md").write_text(head.rstrip() + "\n\n" + (out / "README.md").read_text())
    return table


READ = frozenset({"paradigm", "output_dir", "steps", "methods", "settings", "seeds", "model.size", "rewrite"})


def run(config) -> dict:
    """CLI entry (via ``drpost.bench.quality.run``): ``drpost bench quality --paradigm rlhf|rlvr|dpo``.

    Uses the config's ``methods`` (the paradigm's defaults while the option keeps the SFT default list; a method the
    paradigm lacks is a ConfigError), ``seeds``, ``settings`` (one RL setting of this paradigm; the paradigm's
    default while the option keeps its SFT default), ``model.size``, and ``steps`` when given (``BUDGETS``
    otherwise: the default config's 300 steps would not fit the time budget). Other options are refused if set.
    """
    import sys

    from drpost.config import BenchConfig, ConfigError, refuse_unread, save_resolved
    from drpost.world.rl_settings import RL_SETTINGS, get_rl_setting

    paradigm = config.paradigm
    refuse_unread(config, READ, f"bench quality --paradigm {paradigm}")
    if config.rewrite:
        table = rewrite(config.output_dir, paradigm)
        print((Path(config.output_dir) / "README.md").read_text())
        return table
    default = BenchConfig()
    methods = DEFAULT_METHODS[paradigm] if config.methods == default.methods else list(config.methods)
    wrong = [m for m in methods if m not in METHODS[paradigm]]
    if wrong:
        raise ConfigError(f"option 'methods': {', '.join(map(repr, wrong))} not available for --paradigm {paradigm}; "
                          f"choose from {', '.join(METHODS[paradigm])}")
    if config.settings == default.settings:
        setting = DEFAULT_SETTINGS[paradigm]
    else:
        if len(config.settings) != 1:
            raise ConfigError(f"option 'settings': the {paradigm} benchmark runs one setting, got {config.settings}")
        setting = get_rl_setting(config.settings[0], paradigm, option="settings").name
    assert setting in RL_SETTINGS
    budget = BUDGETS[paradigm]
    if config.steps != default.steps:
        field = "rounds" if paradigm == "rlhf" else "steps"
        budget = replace(budget, **{field: config.steps})
    out_dir = config.output_dir if config.output_dir != default.output_dir else f"results/{paradigm}"
    save_resolved(config, out_dir)  # where the results go (every run is made again: nothing to keep)
    workers = int(os.environ.get("DRPOST_WORKERS", "2"))
    t0 = time.perf_counter()
    records = run_rl(paradigm, setting, methods, list(config.seeds), budget, config.model.size, workers, progress=True)
    command = "drpost " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("drpost") \
        else f"drpost bench quality --paradigm {paradigm}"
    notes = f"Total wall time: {time.perf_counter() - t0:.0f} s with {workers} worker process(es), 1 thread each."
    table = write_rl_results(paradigm, records, out_dir, command, notes)
    print((Path(out_dir) / "README.md").read_text())
    return table
