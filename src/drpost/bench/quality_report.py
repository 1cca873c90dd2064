"""Reporting of the SFT quality benchmark: per-setting tables (target metric and retention), plots, the Pareto front.

Owns ``summarize`` (records -> mean ± s.e. per setting and method), ``pareto_front`` (the methods no other method
beats on both target exact match and retention), ``markdown_table`` (the results README, listing the front),
``plots`` (``methods.png``, ``learning_curves.png``, ``weight_share.png``, ``strength.png`` and one
``pareto_<setting>.png`` per setting: target EM vs retention, front marked) and ``write_results`` / ``rewrite``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from drpost.bench.quality_methods import DR_METHODS, METHODS, SELECTION_BASELINES
from drpost.bench.records import load_records, mark_tuning, record_path, write_record
from drpost.bench.stats import mean_se, pm, versus


def pareto_front(by: dict) -> list[str]:
    """Methods of one setting's summary ``by`` (method -> row) on the Pareto front of (target EM, retention EM):
    m is on it unless another method is >= on both means and > on one."""
    pts = {m: (v["target_em"][0], v["retention_em"][0]) for m, v in by.items()}
    return [m for m, (t, r) in pts.items()
            if not any(t2 >= t and r2 >= r and (t2 > t or r2 > r) for m2, (t2, r2) in pts.items() if m2 != m)]


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
            for k in ("step_ms", "sampler_ms_per_step"):  # absent from records older than the guided sampler
                vals = [r[k] for r in rs if r.get(k) is not None]
                table[s][m][k] = sum(vals) / len(vals) if vals else None
            fw = [r["family_weight"].get(r["target_family"], 0.0) for r in rs if r["family_weight"]]
            table[s][m]["target_family_weight"] = sum(fw) / len(fw) if fw else None
    return table


def retention_verdict(by: dict, sel_best: tuple[float, float], slack: float = 0.02) -> str:
    """The sentence on the Dr methods that keep retention within ``slack`` of FullTraining's (or above it): the best
    of them on the target, against the best data-selection baseline's target EM ``sel_best`` (mean, s.e.)."""
    ft = by["full_training"]["retention_em"][0]
    keep = {m: v["target_em"][0] for m, v in by.items() if m in DR_METHODS and v["retention_em"][0] >= ft - slack}
    if not keep:
        return (f"No Dr method keeps retention within {slack} of FullTraining's ({ft:.3f}).")
    bm = max(keep, key=keep.get)
    verdict, note = versus(by[bm]["target_em"], sel_best)
    return (f"Best Dr method with retention within {slack} of FullTraining's ({ft:.3f}): {by[bm]['label']} "
            f"({keep[bm]:.3f}, retention {by[bm]['retention_em'][0]:.3f}) {verdict} the best data-selection "
            f"baseline ({sel_best[0]:.3f}){note}.")


def markdown_table(table: dict, command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    for s, by in table.items():
        best_em = max(v["target_em"][0] for v in by.values())
        sel_best = max((v["target_em"] for m, v in by.items() if m in SELECTION_BASELINES), default=None)
        lines += [f"### {s}", "",
                  "| method | knob | target EM | target loss | retention EM | weight on target family | s/run "
                  "| ms/step | sampler ms/step |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for v in by.values():
            em = v["target_em"][0]
            mark = " **best**" if em == best_em else ""
            tfw = "" if v["target_family_weight"] is None else f"{v['target_family_weight']:.2f}"
            ms = "" if v.get("step_ms") is None else f"{v['step_ms']:.0f}"
            sampler = "" if not v.get("sampler_ms_per_step") else f"{v['sampler_ms_per_step']:.1f}"
            lines.append(f"| {v['label']} | {v['knob'] if v['knob'] is not None else ''} "
                         f"| {pm(v['target_em'])}{mark} | {pm(v['target_loss'])} | {pm(v['retention_em'])} "
                         f"| {tfw} | {v['wall_seconds']:.0f} | {ms} | {sampler} |")
        front = pareto_front(by)
        lines += ["", "Pareto front (target EM vs retention EM; no other method is at least as good on both): "
                  + ", ".join(by[m]["label"] for m in sorted(front, key=lambda m: -by[m]["target_em"][0])) + "."]
        dr = {m: v["target_em"][0] for m, v in by.items() if m in DR_METHODS}
        if dr and sel_best is not None:
            bm = max(dr, key=dr.get)
            verdict, note = versus(by[bm]["target_em"], sel_best)
            lines += ["", f"Best Dr method: {by[bm]['label']} ({dr[bm]:.3f}) {verdict} the best data-selection "
                          f"baseline ({sel_best[0]:.3f}){note}."]
            lines += [retention_verdict(by, sel_best)] if "full_training" in by else []
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

    for s in settings:  # target metric vs retention, one plot per setting, the Pareto front marked
        by, front = table[s], pareto_front(table[s])
        fig, ax = plt.subplots(figsize=(6.5, 5))
        for m, v in by.items():
            (t, te), (r, re) = v["target_em"], v["retention_em"]
            on = m in front
            ax.errorbar(r, t, xerr=0 if math.isnan(re) else re, yerr=0 if math.isnan(te) else te,
                        fmt="*" if on else "o", ms=11 if on else 6, capsize=2,
                        color="tab:red" if on else ("tab:green" if m in DR_METHODS else "tab:gray"))
            ax.annotate(v["label"], (r, t), fontsize=7, xytext=(3, 3), textcoords="offset points")
        pts = sorted((by[m]["retention_em"][0], by[m]["target_em"][0]) for m in front)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color="tab:red", lw=1, label="Pareto front")
        ax.set_xlabel("retention exact match (held-out pool families)")
        ax.set_ylabel("target test exact match")
        ax.set_title(f"{s}: target vs retention (red stars: Pareto front)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"pareto_{s}.png", dpi=110)
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
    """Write every record to ``raw/`` (if not there yet), then summary.json, README.md and the plots; the rows follow
    the method table's order, and the runs that only served the knob tuning are marked (``mark_tuning``)."""
    out = Path(out_dir)
    settings = list(dict.fromkeys(r["setting"] for r in records))  # the settings in the order given
    order = {m: i for i, m in enumerate(METHODS)}
    records = sorted(mark_tuning(records), key=lambda r: (settings.index(r["setting"]), order.get(r["method"], 1e9),
                                                          json.dumps(r["knob"]), r["seed"]))
    for r in records:
        if not record_path(out, (r["setting"], r["method"], r["knob"], r["seed"])).exists():
            write_record(out, r)
    (out / "summary.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if not k.endswith("_curve")} for r in records], indent=1))
    table = summarize(records)
    (out / "README.md").write_text("# SFT quality results\n\n" + markdown_table(table, command) + "\n")
    plots(records, table, out)
    return table


def rewrite(out_dir: str | Path, command: str) -> dict:
    """Rebuild summary.json, README.md and the plots of ``out_dir`` from every raw per-run JSON record (settings in
    the order of the previous summary.json, if any)."""
    out = Path(out_dir)
    old = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else []
    return write_results(records_on_disk(out, list(dict.fromkeys(r["setting"] for r in old))), out_dir, command)


def records_on_disk(out_dir: str | Path, settings: list[str]) -> list[dict]:
    """Every record in ``out_dir/raw``, the settings in the order of ``settings`` (others after them)."""
    return sorted(load_records(out_dir), key=lambda r: settings.index(r["setting"]) if r["setting"] in settings
                  else len(settings))
