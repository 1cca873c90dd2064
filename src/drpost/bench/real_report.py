"""Tables and plots of the real-model benchmark (``drpost bench real``) from its per-run records.

``write_report(records, out_dir, command)`` writes ``summary.json`` (one flat record per run, the same fields as
``results/sft`` plus ``model`` and ``paradigm``), ``tables.md`` (one table per setting: target EM, retention,
validation EM, knob, s/step; mean +- standard error over seeds; ``base`` is the untrained model) and one
``target_vs_retention_<setting>.png`` per setting with the Pareto front (higher target EM and higher retention)
marked. Tuning-only runs (a knob value that lost on validation) stay in ``raw/`` and are left out of the tables.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from drpost.bench.records import mark_tuning
from drpost.bench.stats import mean_se, paired, pm, versus

DR_METHODS = {"global_subset", "layerwise_subset", "hull", "capped_simplex", "ball_auto", "gem",
              "layerwise_hull_slack", "cone", "span", "halfspace"}
SELECTION = {"dsir", "less", "greats", "random_subset"}


def is_dr(method: str) -> bool:
    """A Dr-family method: a feasible set, alone or composed with a guided sampler or an offline prefilter."""
    return method in DR_METHODS or method.startswith("guided_") or "_prefilter_" in method


def chosen_records(records: list[dict]) -> list[dict]:
    """Drop tuning-only runs (``drpost.bench.records.mark_tuning``: the knob run on the most seeds is the chosen one)."""
    return [r for r in mark_tuning(records) if not r["tuning_only"]]


def summarize(records: list[dict]) -> dict:
    """{setting: {method: row}} with mean and standard error over seeds of the metrics."""
    table: dict = defaultdict(dict)
    by: dict = defaultdict(list)
    for r in chosen_records(records):
        by[(r["setting"], r["method"])].append(r)
    for (s, m), rs in sorted(by.items()):
        row = {"label": rs[0]["label"], "knob": rs[0]["knob"], "seeds": sorted(r["seed"] for r in rs),
               "model": rs[0]["model"]}
        for key in ("target_em", "retention_em", "val_em"):
            row[key] = mean_se([r[key] for r in rs])
        row["target_em_by_seed"] = {r["seed"]: r["target_em"] for r in rs}  # for the paired comparisons
        sps = [r["seconds_per_step"] for r in rs if r.get("seconds_per_step")]
        row["seconds_per_step"] = sum(sps) / len(sps) if sps else None
        row["wall_seconds"] = sum(r["wall_seconds"] for r in rs) / len(rs)
        fw = [r["family_weight"].get(r["target_family"], 0.0) for r in rs if r.get("family_weight")]
        row["target_family_weight"] = sum(fw) / len(fw) if fw else None
        table[s][m] = row
    for rows in table.values():
        front = pareto_front({m: (r["target_em"][0], r["retention_em"][0]) for m, r in rows.items()})
        for m, r in rows.items():
            r["pareto"] = m in front
    return dict(table)


def pareto_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """Names of the points that no other point beats on both coordinates (>= on both and > on one)."""
    front = set()
    for a, (x, y) in points.items():
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for b, (x2, y2) in points.items() if b != a):
            front.add(a)
    return front


def verdict(rows: dict) -> str:
    """One sentence per setting: the best Dr method against FullTraining, Target-only and the selection baselines
    (``versus``'s unpaired verdict, then the difference paired by seed)."""
    def best(names):
        cands = [(rows[m]["target_em"][0], m) for m in names if m in rows]
        return max(cands) if cands else None

    dr, sel = best([m for m in rows if is_dr(m)]), best(SELECTION)
    if dr is None:
        return "No Dr method in this table."
    b = rows[dr[1]]
    parts = [f"Best Dr method: {b['label']} ({dr[0]:.3f})"]
    for ref in ("full_training", "target_only", "base"):
        if ref in rows:
            word, note = versus(b["target_em"], rows[ref]["target_em"])
            parts.append(f"{word} {rows[ref]['label']} ({rows[ref]['target_em'][0]:.3f}){note}"
                         + by_seed(b, rows[ref]))
    if sel is not None:
        word, note = versus(b["target_em"], rows[sel[1]]["target_em"])
        parts.append(f"{word} the best data-selection baseline {rows[sel[1]]['label']} ({sel[0]:.3f}){note}"
                     + by_seed(b, rows[sel[1]]))
    front = [rows[m]["label"] for m in rows if rows[m]["pareto"]]
    return "; ".join(parts) + f". Pareto front (target EM, retention): {', '.join(front)}."


def by_seed(row: dict, ref: dict) -> str:
    """``stats.paired`` on two table rows' per-seed target EM ('' for rows without it)."""
    a, b = row.get("target_em_by_seed"), ref.get("target_em_by_seed")
    return paired(a, b) if a and b else ""


def markdown(table: dict, command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    for s, rows in table.items():
        n = max(len(r["seeds"]) for r in rows.values())
        lines += [f"### {s}", "", f"Mean ± standard error over up to {n} seeds (the seed redraws the data). "
                  "Pareto: on the target-EM / retention front.", "",
                  "| method | knob | target EM | retention EM | val EM | weight on target family | s/step | seeds | "
                  "Pareto |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows.values(), key=lambda row: -row["target_em"][0]):
            fw = "" if r["target_family_weight"] is None else f"{r['target_family_weight']:.2f}"
            sps = "" if r["seconds_per_step"] is None else f"{r['seconds_per_step']:.2f}"
            knob = "" if r["knob"] is None else r["knob"]
            lines.append(f"| {r['label']} | {knob} | {pm(r['target_em'])} | {pm(r['retention_em'])} | "
                         f"{pm(r['val_em'])} | {fw} | {sps} | {len(r['seeds'])} | {'yes' if r['pareto'] else ''} |")
        lines += ["", verdict(rows), ""]
    return "\n".join(lines)


def pareto_scatter(ax, rows: dict, x_key: str, color_of) -> None:
    """Target EM (mean ± s.e.) against ``x_key`` for every row of one setting's table (method -> row), labelled,
    coloured by ``color_of(method)``, filled where the row is on the Pareto front, the front dashed."""
    for m, r in rows.items():
        (x, xe), (y, ye) = r[x_key], r["target_em"]
        color = color_of(m)
        ax.errorbar(x, y, xerr=0 if xe != xe else xe, yerr=0 if ye != ye else ye, fmt="o", color=color,
                    mfc=color if r["pareto"] else "white", capsize=2)
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    front = sorted((r[x_key][0], r["target_em"][0]) for r in rows.values() if r["pareto"])
    if len(front) > 1:
        ax.plot(*zip(*front), "--", color="black", lw=0.8, label="Pareto front")
        ax.legend(loc="best", fontsize=7)


def plots(table: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for s, rows in table.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        pareto_scatter(ax, rows, "retention_em",
                       lambda m: "tab:red" if is_dr(m) else "tab:blue" if m in SELECTION else "tab:gray")
        ax.set_xlabel("retention EM (held-out pool families)")
        ax.set_ylabel("target EM (test)")
        ax.set_title(f"{s}: target vs retention (filled = Pareto; red Dr, blue selection)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"target_vs_retention_{s}.png", dpi=110)
        plt.close(fig)


def write_files(records: list[dict], out_dir: str | Path, command: str, summarize, markdown, plots) -> dict:
    """The report files of every real-model paradigm: summary.json (every record), tables.md (``markdown`` of
    ``summarize(records)``, also printed) and the plots (``plots(records, table, out)``); returns the table."""
    out = Path(out_dir)
    (out / "summary.json").write_text(json.dumps(records, indent=1))
    table = summarize(records)
    text = markdown(table, command)
    (out / "tables.md").write_text(text + "\n")
    plots(records, table, out)
    print(text)
    return table


def write_report(records: list[dict], out_dir: str | Path, command: str) -> dict:
    return write_files(records, out_dir, command, summarize, markdown, lambda recs, table, out: plots(table, out))


__all__ = ["chosen_records", "is_dr", "markdown", "pareto_scatter", "write_files", "pareto_front", "plots", "summarize", "verdict", "write_report"]
