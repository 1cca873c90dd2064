"""The report of ``drpost bench trl`` (``drpost.bench.trl``): ``table`` (trainer x variant: median over rounds of
the per-run median step, wall and CPU, and the ratios to the plain trainer and to the plain trainer on the union
batch), ``write`` (``trl.json``, ``summary.md``, ``ratios.png``)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

CLOCKS = ("wall", "cpu")
UNION = "plain_union"  # the plain trainer on the union batch (general rows + the adapter's target rows)


def table(res: dict) -> list[dict]:
    """One row per trainer x variant with runs: ``{clock}_s`` (median over rounds), ``{clock}_ratio`` (that median
    over the plain trainer's), ``{clock}_union_ratio`` (over the plain trainer's on the union batch, ``plain_union``;
    NaN where it did not run), ``{clock}_round_ratios`` (each round's variant / plain of the same round)."""
    runs = res["runs"]
    rows = []

    def median(rs: list[dict], clock: str) -> float:
        return statistics.median(r[f"{clock}_s"] for r in rs) if rs else math.nan

    for kind in res["settings"]["schedule"]:
        plain = {r["round"]: r for r in runs if r["trainer"] == kind and r["variant"] == "plain"}
        union = [r for r in runs if r["trainer"] == kind and r["variant"] == UNION]
        for variant in res["settings"]["variants"]:
            mine = [r for r in runs if r["trainer"] == kind and r["variant"] == variant]
            if not mine:
                continue
            row = {"trainer": kind, "variant": variant, "rounds": len(mine)}
            for clock in CLOCKS:
                med, base, ub = median(mine, clock), median(list(plain.values()), clock), median(union, clock)
                row[f"{clock}_s"] = med
                row[f"{clock}_ratio"] = med / base if base > 0 else math.nan
                row[f"{clock}_union_ratio"] = med / ub if ub > 0 else math.nan
                row[f"{clock}_round_ratios"] = [r[f"{clock}_s"] / plain[r["round"]][f"{clock}_s"] for r in mine
                                                if r["round"] in plain and plain[r["round"]][f"{clock}_s"] > 0]
            rows.append(row)
    return rows


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def markdown(res: dict) -> str:
    """summary.md: the command, the model and machine, the table (the headline clock's columns in bold)."""
    s, m, head = res["settings"], res["machine"], res["config"]["clock"]
    sched = "; ".join(f"{k}: {v['steps']} steps, {v['warmup']} warm-up, {v['repeats']} round(s)"
                      for k, v in s["schedule"].items())
    bf16 = ", ".join(m["native_bf16"]) if m["native_bf16"] else "none: bf16 is emulated, slower than fp32"
    lines = [
        "# TRL adapters' step time (`drpost bench trl`)", "",
        f"Command: `{res['command']}`", "",
        f"Model: random-weight Llama, hidden {s['hidden']}, {s['layers']} layer(s), {s['heads']} head(s), vocab "
        f"{s['vocab']} (untied LM head), {s['params'] / 1e6:.2f}M parameters; T={s['seq']}, {s['batch']} general "
        f"rows per step (SFT rows, DPO pairs, GRPO completions = {s['batch'] // s['generations']} prompt(s) x "
        f"{s['generations']} generations) + {s['target_batch_size']} target sample (GRPO: 1 prompt x "
        f"{s['generations']}); precision {s['precision']}"
        f"{' (TRL bf16=True)' if s['precision'] == 'bf16' else ''}; {sched}.", "",
        f"Machine: {m['platform']}, {m['cpu_model']} ({m['cpus']} CPUs; native bf16: {bf16}), python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}; torch threads {m['torch_threads']}, "
        f"OMP_NUM_THREADS={m['omp_num_threads']}; measured GEMM rate {m['gemm_gflops']:.1f} GFLOP/s "
        f"({s['precision']}), copy bandwidth {m['bandwidth_gbs']:.1f} GB/s. Wall time of the benchmark "
        f"{res.get('wall_s', 0):.0f} s{' (partial: not all rounds finished)' if res.get('partial') else ''}.", "",
        "A run = one fresh trainer, its steps timed by a TrainerCallback (on_step_begin -> on_step_end: data, "
        "forward, backward, clipping, optimizer; GRPO: generation too); the run's figure is the median step after "
        "the warm-up steps. Before the timed rounds each trainer ran once untimed (the process's first-call costs); the "
        "variants' order rotates each round. plain = the TRL trainer on the general rows; plain_union = the TRL "
        "trainer on the union batch (the general rows plus the adapter's target rows: the data the adapter's step "
        "sees). s/step = median over rounds; ratio = that median / plain's; vs union = that median / plain_union's "
        f"({head} clock: the adapter's own overhead, apart from the target rows' cost); rounds = each round's "
        f"ratio to the plain run of the same round ({head} clock). Headline clock: **{head}** "
        "(cpu = this process's CPU time, all threads; wall = elapsed).", "",
        "| trainer | variant | wall s/step | wall ratio | CPU s/step | CPU ratio | vs union | rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(text: str, clock: str) -> str:
        return f"**{text}**" if clock == head else text

    for row in res["table"]:
        rounds = ", ".join(f"{x:.2f}" for x in row[f"{head}_round_ratios"])
        cells = [cell(f"{row[c + '_s']:.3f}", c) + " | " + cell(f"{row[c + '_ratio']:.2f}x", c) for c in CLOCKS]
        vs_union = row[f"{head}_union_ratio"]
        lines.append(f"| {row['trainer']} | {row['variant']} | {' | '.join(cells)} | "
                     f"{'' if vs_union != vs_union else f'{vs_union:.2f}x'} | {rounds} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, out: Path) -> None:
    """ratios.png: the headline clock's ratio to plain TRL per trainer x method (bars), each round's ratio (dots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = res["config"]["clock"]
    rows = [r for r in res["table"] if r["variant"] != "plain"]
    if not rows:
        return
    kinds = list(dict.fromkeys(r["trainer"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(1.6 + 1.8 * len(kinds), 3.6))
    for j, variant in enumerate(variants):
        for i, kind in enumerate(kinds):
            row = next((r for r in rows if r["trainer"] == kind and r["variant"] == variant), None)
            if row is None:
                continue
            x = i + (j - (len(variants) - 1) / 2) * width
            ax.bar(x, row[f"{head}_ratio"], width * 0.9, color=f"C{j}", label=variant if i == 0 else None)
            ax.plot([x] * len(row[f"{head}_round_ratios"]), row[f"{head}_round_ratios"], "k.", ms=4)
    ax.axhline(1.0, color="gray", lw=1, ls="--")
    ax.set_xticks(range(len(kinds)), [k.upper() for k in kinds])
    ax.set_ylabel(f"step time / plain TRL ({head})")
    ax.set_title(f"drpost TRL adapters vs plain TRL ({res['settings']['precision']})", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out / "ratios.png", dpi=110)
    plt.close(fig)


def write(res: dict, out: Path) -> None:
    """trl.json, summary.md and ratios.png under ``out``."""
    (out / "trl.json").write_text(json.dumps(_jsonable(res), indent=1))
    (out / "summary.md").write_text(markdown(res))
    plot(res, out)
