"""Tables and plots of the real-model DPO / RLVR benchmark (``drpost bench real paradigm=dpo|rlvr``) from its records.

``write_report(records, out_dir, command)`` writes ``summary.json`` (every record), ``tables.md`` (one README-ready
table per setting: knob and learning rate, target EM, for RLVR the sampled target reward, retention EM, KL to the
start model (the base model, or the SFT warm start for RLVR), validation EM, s/step, seeds; mean ± standard error
over seeds; the untrained ``base`` row first, then by target EM; runs that only served the learning-rate tuning left
out) and one ``target_vs_kl_<setting>.png`` per setting, with the Pareto front (higher target EM at lower KL) marked.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from drpost.bench.real_common import split_lr
from drpost.bench.real_report import by_seed, chosen_records, is_dr, pareto_front, pareto_scatter, write_files
from drpost.bench.stats import mean_se, pm, versus

METRICS = ("target_em", "target_reward", "retention_em", "val_em", "kl")


def summarize(records: list[dict]) -> dict:
    """{setting: {method: row}}: mean and standard error over seeds of ``METRICS`` (those the records carry),
    the learning rate, the mean s/step and wall time, and ``pareto`` (on the target-EM / KL front). Runs that only
    served the tuning (a learning rate that lost on validation) are left out."""
    by: dict = defaultdict(list)
    for r in chosen_records(records):
        by[(r["setting"], r["method"])].append(r)
    table: dict = defaultdict(dict)
    for (s, m), rs in sorted(by.items()):
        row = {"label": rs[0]["label"], "knob": split_lr(rs[0]["knob"])[0],  # the tuned lr has its own column
               "seeds": sorted(r["seed"] for r in rs), "model": rs[0]["model"], "paradigm": rs[0]["paradigm"],
               "lr": rs[0]["budget"]["lr"] if rs[0].get("budget") else None}
        for key in METRICS:
            if all(key in r for r in rs):
                row[key] = mean_se([r[key] for r in rs])
        row["target_em_by_seed"] = {r["seed"]: r["target_em"] for r in rs}  # for the paired comparisons
        sps = [r["seconds_per_step"] for r in rs if r.get("seconds_per_step")]
        row["seconds_per_step"] = sum(sps) / len(sps) if sps else None
        row["wall_seconds"] = sum(r["wall_seconds"] for r in rs) / len(rs)
        table[s][m] = row
    for rows in table.values():
        front = pareto_front({m: (r["target_em"][0], -r["kl"][0]) for m, r in rows.items()})
        for m, r in rows.items():
            r["pareto"] = m in front
    return dict(table)


def ordered(rows: dict) -> list[str]:
    """``base`` first, then by target EM (highest first)."""
    return sorted(rows, key=lambda m: (m != "base", -rows[m]["target_em"][0]))


def verdict(rows: dict) -> str:
    """The best Dr method against FullTraining, Target-only and the untrained model, on target EM (``versus``'s
    unpaired verdict, then the difference paired by seed) and KL."""
    dr = [m for m in rows if is_dr(m)]
    if not dr:
        return "No Dr method in this table."
    best = max(dr, key=lambda m: rows[m]["target_em"][0])
    b = rows[best]
    parts = [f"Best Dr method: {b['label']} (target EM {b['target_em'][0]:.3f}, KL {b['kl'][0]:.3f})"]
    for ref in ("full_training", "target_only", "base"):
        if ref in rows:
            word, note = versus(b["target_em"], rows[ref]["target_em"])
            parts.append(f"{word} {rows[ref]['label']} ({rows[ref]['target_em'][0]:.3f}, "
                         f"KL {rows[ref]['kl'][0]:.3f}){note}{by_seed(b, rows[ref])}")
    front = [rows[m]["label"] for m in ordered(rows) if rows[m]["pareto"]]
    return "; ".join(parts) + f". Pareto front (target EM up, KL down): {', '.join(front)}."


def markdown(table: dict, command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    for s, rows in table.items():
        paradigm = next(iter(rows.values()))["paradigm"].upper()
        reward = any("target_reward" in r for r in rows.values())
        n = max(len(r["seeds"]) for r in rows.values())
        lines += [f"### {s} ({paradigm})", "",
                  f"Mean ± standard error over up to {n} seeds (the seed redraws the data). Target EM: strict greedy "
                  "exact match on the test targets"
                  + ("; target reward: mean shaped reward (1 / 0.25 / 0) of sampled replies" if reward else "")
                  + "; KL: to the start model (the base model, or the SFT warm start) on the test targets "
                  "(nats per reply).", "",
                  "| method | knob | lr | target EM |" + (" target reward |" if reward else "")
                  + " retention EM | KL | val EM | s/step | seeds |",
                  "|---|---|---|---|" + ("---|" if reward else "") + "---|---|---|---|---|"]
        for m in ordered(rows):
            r = rows[m]
            knob = "" if r["knob"] is None else r["knob"]
            sps = "" if r["seconds_per_step"] is None else f"{r['seconds_per_step']:.2f}"
            rw = f" {pm(r['target_reward'])} |" if reward else ""
            lr = "" if r.get("lr") is None else f"{r['lr']:g}"
            lines.append(f"| {r['label']} | {knob} | {lr} | {pm(r['target_em'])} |{rw} {pm(r['retention_em'])} | "
                         f"{pm(r['kl'])} | {pm(r['val_em'])} | {sps} | {len(r['seeds'])} |")
        lines += ["", verdict(rows), ""]
    return "\n".join(lines)


def plots(table: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for s, rows in table.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        pareto_scatter(ax, rows, "kl", lambda m: "tab:red" if is_dr(m) else "tab:gray")
        paradigm = next(iter(rows.values()))["paradigm"].upper()
        ax.set_xlabel("KL to the start model (test targets, nats per reply)")
        ax.set_ylabel("target EM (test, greedy, strict)")
        ax.set_title(f"{paradigm} {s}: target vs KL (filled = Pareto; red Dr)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"target_vs_kl_{s}.png", dpi=110)
        plt.close(fig)


def write_report(records: list[dict], out_dir: str | Path, command: str) -> dict:
    return write_files(records, out_dir, command, summarize, markdown, lambda recs, table, out: plots(table, out))


__all__ = ["markdown", "ordered", "plots", "summarize", "verdict", "write_report"]
