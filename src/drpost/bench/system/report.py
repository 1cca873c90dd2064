"""System benchmark, the report: the goals (``GOALS``) checked per configuration, ``summary.md`` (ratios, floors,
components, peak memory per method, logits memory), the plots and the JSON conversion of the results.

Part of ``drpost.bench.system`` (run it with ``drpost bench system``).
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import Tensor

from drpost.bench.system.cases import COMPONENTS, cfg_label

GOALS = {
    "lora_one_pass_auto": 1.10,
    "full_one_pass_compress": 1.10,
    "full_one_pass_exact": 1.25,
    "floor_gap": 1.10,
    "convex_exact": 1.50,
    "auto_vs_best": 1.05,
    "peak_memory": 1.15,
    "global_vs_layerwise": 1.00,
}


def evaluate_goals(cases: list[dict]) -> list[dict]:
    """One row per (goal, configuration, method) with the measured value, the target and pass/miss."""
    out = []
    for c in cases:
        lab, mode = cfg_label(c["config"]), c["config"]["mode"]
        for name, r in c["methods"].items():
            if r["kind"] != "dr" or not r["one_pass"]:
                continue
            meth = r["kw"].get("method")
            scoring = r["kw"].get("scoring", "auto")
            subset = meth in ("global_subset", "layerwise_subset") and r["kw"].get("selection", "topk") == "topk"
            goal = None
            if subset and mode == "lora" and scoring == "auto":
                goal = "lora_one_pass_auto"
            elif subset and mode == "full" and scoring == "compress":
                goal = "full_one_pass_compress"
            elif subset and mode == "full" and scoring == "auto":
                goal = "full_one_pass_exact"
            elif meth == "hull" and scoring == "auto":
                goal = "convex_exact"
            if goal is not None:
                out.append(dict(goal=goal, config=lab, method=name, value=r["ratio"], target=GOALS[goal],
                                met=r["ratio"] <= GOALS[goal], held_back_by=r["held_back_by"]))
            if subset and scoring == "auto" and r.get("peak_mem_ratio") is not None:
                out.append(dict(goal="peak_memory", config=lab, method=name, value=r["peak_mem_ratio"],
                                target=GOALS["peak_memory"], met=r["peak_mem_ratio"] <= GOALS["peak_memory"],
                                held_back_by=f"step memory {r['step_mem_ratio']:.2f}x"
                                if r.get("step_mem_ratio") is not None else ""))
            if "over_floor" in r and (subset or meth == "full_training"):
                out.append(dict(goal="floor_gap", config=lab, method=name, value=r["over_floor"],
                                target=GOALS["floor_gap"], met=r["over_floor"] <= GOALS["floor_gap"],
                                held_back_by=r["held_back_by"]))
        for kind, sc in c.get("scoring_check", {}).items():
            out.append(dict(goal="auto_vs_best", config=lab, method=f"scoring auto ({kind})",
                            value=sc["auto_over_best_fixed"], target=GOALS["auto_vs_best"],
                            met=sc["auto_over_best_fixed"] <= GOALS["auto_vs_best"],
                            held_back_by=f"best fixed = {sc['best_fixed']}"))
        ms = c["methods"]
        g_name, l_name = "global/one_pass/auto", "layerwise/one_pass/auto"
        if g_name in ms and l_name in ms:  # the same rows kept: the global scope should cost no more
            v = ms[g_name]["ratio"] / ms[l_name]["ratio"]
            out.append(dict(goal="global_vs_layerwise", config=lab, method=f"{g_name} / {l_name}", value=v,
                            target=GOALS["global_vs_layerwise"], met=v <= GOALS["global_vs_layerwise"],
                            held_back_by=f"IQRs {_iqr(ms[g_name])} vs {_iqr(ms[l_name])}"))
        # step-level auto vs best fixed where the fixed methods ran
        fixed = [f"layerwise/one_pass/{s}" for s in ("full_ghost", "reduced_ghost", "direct")]
        if "layerwise/one_pass/auto" in ms and all(f in ms for f in fixed):
            best = min(fixed, key=lambda f: ms[f]["total_s"])
            v = ms["layerwise/one_pass/auto"]["total_s"] / ms[best]["total_s"]
            out.append(dict(goal="auto_vs_best", config=lab, method="layerwise step auto", value=v,
                            target=GOALS["auto_vs_best"], met=v <= GOALS["auto_vs_best"],
                            held_back_by=f"best fixed = {best.split('/')[-1]}"))
    return out


def _iqr(row: dict) -> str:
    return f"[{row['ratio_q25']:.2f}-{row['ratio_q75']:.2f}]" if "ratio_q25" in row else "—"


def _ms(x):
    return "—" if x is None else f"{1e3 * x:.1f}"


def _mem(row: dict, key: str) -> str:
    b, r = row.get(f"{key}_bytes"), row.get(f"{key}_ratio")
    return "—" if b is None else f"{b / 2**20:.0f}" + ("" if r is None else f" ({r:.2f}x)")


def _arith(row: dict, rate: bool = True) -> str:
    """'FLOP ratio · rate ratio' of a method's row (``flops``; the FLOP ratio alone, as 'Nx', without ``rate``), or
    — where a run before the count made it."""
    if row.get("flop_ratio") is None:
        return "—"
    return f"{row['flop_ratio']:.2f} · {row['rate_ratio']:.2f}" if rate else f"{row['flop_ratio']:.2f}x"


def _logits_line(c: dict) -> str:
    lg = c.get("logits")
    if not lg:
        return ""
    share = lg.get("logits_over_standard_step_mem")
    T, k = c["config"]["T"], lg.get("window_positions", c["config"]["T"])
    window = (f"; the loss window (the LM head on the last {k} of {T} positions) makes it "
              f"{lg['window_logits_bytes'] / 2**20:.1f} MiB" if k < T else "")
    return (f"Logits: R x T x vocab x 4 bytes = {lg['logits_bytes'] / 2**20:.1f} MiB per logits-sized tensor (the "
            f"loss holds up to three at once in the backward)"
            + ("" if share is None else f", {share:.2f}x the memory the standard step adds") + window
            + f"; computing the LM head only at the {lg['label_positions']} label positions would save "
            f"{lg['head_at_labels_saves_bytes'] / 2**20:.2f} MiB per such tensor"
            + (" (every position but each row's last is labelled here)." if k == T else "."))


def _window(cases: list[dict]) -> list[str]:
    """The loss window's saving (``prompt_frac``): each configuration measured without and with the prompt, its
    standard step, each core method's step and ratio, and one logits-sized tensor, side by side."""
    from drpost.bench.system.cases import method_list

    bare = {cfg_label(c["config"]): c for c in cases if not c["config"].get("prompt_frac")}
    pairs = [(bare[cfg_label({**c["config"], "prompt_frac": 0})], c) for c in cases if c["config"].get("prompt_frac")
             and cfg_label({**c["config"], "prompt_frac": 0}) in bare]
    if not pairs:
        return []
    names = [m.name for m in method_list() if m.core and m.kind == "dr" and all(m.name in c["methods"]
                                                                                  for p in pairs for c in p)]
    L = ["## The loss window\n", "Each configuration measured twice, back to back: every position a label, then the "
         "prompt masked (the LM head and the loss on the last k positions only). Seconds per step (every position "
         "→ window, and the saving), the ratio to the standard step of the same rows and its FLOP ratio (counted, "
         "`flops`), and one logits-sized tensor (the loss holds up to three).\n",
         "| config | k / T | standard step s | " + " | ".join(f"{nm} s (ratio)" for nm in names) + " | logits MiB |",
         "|---" * (len(names) + 4) + "|"]

    def pair(a: float, b: float) -> str:
        return f"{a:.2f} → {b:.2f} ({100 * (b - a) / a:+.0f}%)"

    for a, b in pairs:
        cells = [f"{pair(a['methods'][nm]['total_s'], b['methods'][nm]['total_s'])} "
                 f"({a['methods'][nm]['ratio']:.2f}x → {b['methods'][nm]['ratio']:.2f}x; FLOPs "
                 f"{_arith(a['methods'][nm], rate=False)} → {_arith(b['methods'][nm], rate=False)})" for nm in names]
        lg_a, lg_b = a.get("logits", {}), b.get("logits", {})
        mib = (f"{lg_a['logits_bytes'] / 2**20:.1f} → {lg_b['window_logits_bytes'] / 2**20:.1f}"
               if "window_logits_bytes" in lg_b else "—")
        L.append(f"| {cfg_label(a['config'])} | {lg_b.get('window_positions', '—')} / {b['config']['T']} | "
                 f"{pair(a['standard_s'], b['standard_s'])} | " + " | ".join(cells) + f" | {mib} |")
    return L + [""]


def _overview(cases: list[dict]) -> list[str]:
    """One line per configuration: time ratio, peak-memory ratio and step-memory ratio of each core method."""
    from drpost.bench.system.cases import method_list

    names = [m.name for m in method_list() if m.core and m.kind != "standard"]
    names = [nm for nm in names if any(nm in c["methods"] for c in cases)]
    if not names:
        return []

    def cell(r: dict | None) -> str:
        if r is None:
            return "—"
        f = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
        return f"{f(r['ratio'])} · {f(r.get('peak_mem_ratio'))} · {f(r.get('step_mem_ratio'))}"

    L = ["## Overview\n", "Per configuration and method: time ratio · peak-memory ratio · step-memory ratio, each to "
         "the standard step (memory: see the note above; — = not measured).\n",
         "| config | standard step | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for c in cases:
        L.append(f"| {cfg_label(c['config'])} | {1e3 * c['standard_s']:.0f} ms | "
                 + " | ".join(cell(c["methods"].get(nm)) for nm in names) + " |")
    return L + [""]


def write_markdown(res: dict, path: Path, command: str) -> None:
    L = ["# System benchmark (`drpost bench system`)\n", f"Command: `{command}`\n",
         f"Machine: {res['machine']['platform']}, torch {res['machine']['torch']}, device {res['machine']['device']}, "
         f"{res['machine']['threads']} thread(s); measured GEMM rate {res['machine']['gemm_gflops']:.1f} GFLOP/s, "
         f"copy bandwidth {res['machine']['bandwidth_gbs']:.1f} GB/s. Wall time {res['wall_s']:.0f} s.\n",
         "Ratios are to a standard step (plain token-mean forward/backward + AdamW step) on the same union batch "
         "(n general + m target rows): median over interleaved repeats, [IQR] in brackets. *Floor* = measured "
         "standard step − skipped weight-gradient GEMMs + the per-row gradients the backward materializes for "
         "weights whose per-row gradients are no larger than their factors (every LoRA matrix) + estimated scoring "
         "FLOPs/bytes + the assembly (one GEMM per use over the rows that carry weight, or one GEMV per weight over "
         "held or streamed per-row gradients), at the measured rates (`drpost.bench.system.floors`). *Streamed* = "
         "blocks LayerWiseSubset scored direct, solved and assembled at once from their whole per-row gradients "
         "(`drpost.geometry.stream`). *Held back "
         "by* = the component with the largest excess over the standard step's same component (scoring/solve/"
         "assembly count in full). *Peak* = peak memory during one more step of the method after the timed "
         "repeats (CPU: the process's peak RSS; CUDA: max_memory_allocated), *step* = the peak minus the memory at "
         "the step's start; MiB, (x the standard step's) (`drpost.bench.system.memory`). *FLOP ratio* = the matrix-"
         "product FLOPs of one more step of the method, counted (`torch.utils.flop_counter`), / the standard step's; "
         "*rate ratio* = time ratio / FLOP ratio: above 1, the method ran its FLOPs slower than the standard step "
         "(memory-bound or small products, overhead), which no count of its arithmetic shows "
         "(`drpost.bench.system.flops`).\n"]
    if res.get("partial"):
        L.insert(3, "**Partial**: the configurations measured so far (written after each one); the run has not "
                    "finished.\n")
    if res.get("carried_cases"):
        L.insert(3, f"**Resumed**: {res['carried_cases']} of the {len(res['cases'])} configurations were measured by "
                    "an earlier, stopped run of the same command on this machine (its wall time is not counted "
                    "above).\n")
    g = res["goals"]
    L.append("## Goals\n")
    L.append("| goal | target | met / checked | worst case (value, config, method, held back by) |")
    L.append("|---|---|---|---|")
    for key, target in GOALS.items():
        rows = [r for r in g if r["goal"] == key]
        if not rows:
            L.append(f"| {key} | ≤ {target:.2f} | not measured | |")
            continue
        worst = max(rows, key=lambda r: r["value"])
        ok = sum(r["met"] for r in rows)
        mark = "✅" if ok == len(rows) else ("⚠️" if ok else "❌")
        L.append(f"| {key} | ≤ {target:.2f} | {mark} {ok}/{len(rows)} | {worst['value']:.2f} ({worst['config']}, "
                 f"{worst['method']}, {worst['held_back_by']}) |")
    L.append("")
    L.append("Goal keys: `lora_one_pass_auto` = one-pass Global/LayerWiseSubset, scoring auto, LoRA; "
             "`full_one_pass_compress` = the same, full FT, compress; `full_one_pass_exact` = full FT, auto (exact); "
             "`floor_gap` = measured / analytic floor for one-pass subset methods and full_training; `convex_exact` = "
             "hull with the exact Gram; `auto_vs_best` = scoring auto / best fixed exact method (scoring component "
             "on one captured step, and whole layerwise step where the fixed methods ran); `peak_memory` = peak memory of "
             "the one-pass subset methods with scoring auto / the standard step's; `global_vs_layerwise` = one-pass "
             "GlobalSubset's time ratio / LayerWiseSubset's (scoring auto; their IQRs say how much of a miss is "
             "noise).\n")
    L += _overview(res["cases"])
    L += _window(res["cases"])
    for c in res["cases"]:
        cf = c["config"]
        L.append(f"## {cfg_label(cf)} — {c['params'] / 1e6:.2f}M params ({c['trainable'] / 1e6:.3f}M trainable); "
                 f"standard step {1e3 * c['standard_s']:.1f} ms\n")
        L.append("| method | ratio [IQR] | floor | meas/floor | FLOP ratio · rate ratio | fwd | bwd | scoring | solve | "
                 "assembly | opt | held back by | scoring choices | peak MiB | step MiB |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, r in c["methods"].items():
            comp = r["components_s"]
            fl = f"{r['floor_ratio']:.2f}x" if "floor_ratio" in r else "—"
            of = f"{r['over_floor']:.2f}" if "over_floor" in r else "—"
            ch = ", ".join(f"{k}:{v}" for k, v in r.get("scoring_choices", {}).items())
            if r.get("streamed_blocks"):
                ch += f" ({r['streamed_blocks']} streamed)"
            if r["kind"] == "func":
                ch = f"per-sample grads by {r.get('func_mode')} (in bwd)"
            L.append(f"| {name} | {r['ratio']:.2f}x [{r['ratio_q25']:.2f}–{r['ratio_q75']:.2f}] | {fl} | {of} | "
                     f"{_arith(r)} | " + " | ".join(_ms(comp[k]) for k in COMPONENTS)
                     + f" | {r['held_back_by'] or ''} | {ch} | {_mem(r, 'peak_mem')} | {_mem(r, 'step_mem')} |")
        if _logits_line(c):
            L.append("")
            L.append(_logits_line(c))
        sc = c.get("scoring_check", {})
        if sc:
            L.append("")
            L.append("Scoring component only (one captured step, all blocks): "
                     + "; ".join(f"{k}: auto {1e3 * v['auto_s']:.1f} ms vs best fixed {v['best_fixed']} "
                                 f"{1e3 * v['fixed_s'][v['best_fixed']]:.1f} ms ({v['auto_over_best_fixed']:.2f}x), "
                                 f"per-block best {1e3 * v['per_block_best_s']:.1f} ms"
                                 for k, v in sc.items()))
        L.append("")
    x = res.get("crossovers")
    if x:
        ms, ts = x["m_sweep"], x["T_sweep"]
        f = lambda v: "none in range" if v is None else f"{v:.1f}"  # noqa: E731
        L.append(f"## Scoring crossovers (one {x['shape'][0]}x{x['shape'][1]} layer, n={x['n']})\n")
        L.append("| crossover | analytic (paper formula) | cost model (calibrated) | measured |")
        L.append("|---|---|---|---|")
        L.append(f"| m*: full vs reduced ghost (T={ms['T']}) | {f(ms['analytic_m_star'])} | "
                 f"{f(ms['cost_model_m_star'])} | {f(ms['measured_m_star'])} |")
        L.append(f"| T*: reduced ghost vs direct (m=1) | {f(ts['analytic_T_star'])} | "
                 f"{f(ts['cost_model_T_star'])} | {f(ts['measured_T_star'])} |")
        L.append("\nSee `crossovers.png` (measured points, cost-model curves, analytic crossover lines) and "
                 "`breakdown.png` (per-component stacked bars of the main configurations).\n")
    path.write_text("\n".join(L) + "\n")


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = res.get("crossovers")
    if x:
        fig, axs = plt.subplots(1, 2, figsize=(11, 4.2))
        ms, ts = x["m_sweep"], x["T_sweep"]
        ax = axs[0]
        ax.loglog(ms["m"], ms["full_ghost_s"], "o-", label="full_ghost (measured)")
        ax.loglog(ms["m"], ms["reduced_ghost_s"], "s-", label="reduced_ghost (measured)")
        ax.loglog(ms["m"], ms["model_full_ghost_s"], "--", color="C0", alpha=0.6, label="full_ghost (cost model)")
        ax.loglog(ms["m"], ms["model_reduced_ghost_s"], "--", color="C1", alpha=0.6,
                  label="reduced_ghost (cost model)")
        ax.axvline(ms["analytic_m_star"], color="k", ls=":", label=f"analytic m* = {ms['analytic_m_star']:.1f}")
        if ms["measured_m_star"]:
            ax.axvline(ms["measured_m_star"], color="r", ls="-.", label=f"measured m* = {ms['measured_m_star']:.1f}")
        ax.set(xlabel="target rows m", ylabel="scoring time (s)",
               title=f"full vs reduced ghost, {x['shape'][0]}x{x['shape'][1]}, T={ms['T']}, n={x['n']}")
        ax.legend(fontsize=7)
        ax = axs[1]
        ax.loglog(ts["T"], ts["reduced_ghost_s"], "s-", color="C1", label="reduced_ghost (measured)")
        ax.loglog(ts["T"], ts["direct_s"], "^-", color="C2", label="direct (measured)")
        ax.loglog(ts["T"], ts["model_reduced_ghost_s"], "--", color="C1", alpha=0.6, label="reduced_ghost (model)")
        ax.loglog(ts["T"], ts["model_direct_s"], "--", color="C2", alpha=0.6, label="direct (cost model)")
        ax.axvline(ts["analytic_T_star"], color="k", ls=":", label=f"analytic T* = {ts['analytic_T_star']:.0f}")
        if ts["measured_T_star"]:
            ax.axvline(ts["measured_T_star"], color="r", ls="-.", label=f"measured T* = {ts['measured_T_star']:.0f}")
        ax.set(xlabel="tokens per row T", ylabel="scoring time (s)", title=f"reduced ghost vs direct, m=1, n={x['n']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "crossovers.png", dpi=110)
        plt.close(fig)
    mains = [c for c in res["cases"] if c["config"].get("methods") == "all"] or res["cases"][:8]
    fig, axs = plt.subplots(len(mains), 1, figsize=(11, 3.6 * len(mains)), squeeze=False)
    for ax, c in zip(axs[:, 0], mains):
        names = list(c["methods"])
        std = c["standard_s"]
        bottom = [0.0] * len(names)
        for k in COMPONENTS:
            vals = [c["methods"][nm]["components_s"][k] / std for nm in names]
            ax.bar(range(len(names)), vals, bottom=bottom, label=k)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for i, nm in enumerate(names):
            r = c["methods"][nm]
            if "floor_ratio" in r:
                ax.plot([i - 0.4, i + 0.4], [r["floor_ratio"]] * 2, "k-", lw=2)
        ax.axhline(1.0, color="gray", ls=":")
        ax.axhline(1.10, color="g", ls="--", lw=0.8)
        ax.axhline(1.25, color="orange", ls="--", lw=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("time / standard step")
        ax.set_title(f"{cfg_label(c['config'])} (black bar = analytic floor; dashed = 1.10x, 1.25x goals)")
        ax.legend(fontsize=7, ncol=6)
    fig.tight_layout()
    fig.savefig(out / "breakdown.png", dpi=110)
    plt.close(fig)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x

