"""System benchmark, the measurement: one configuration's interleaved repeats and memory step (``measure_case``), the
scoring crossover sweeps, the configuration grids (tiny Llama sizes, or SmolLM2-135M shapes with ``model="smollm2"``),
and ``run_system_bench`` which runs them and writes the report.

Part of ``drpost.bench.system`` (run it with ``drpost bench system``).
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from drpost.bench.machine import machine_record
from drpost.bench.system.cases import (
    COMPONENTS,
    LR,
    SIZES,
    SMOLLM2,
    VOCAB,
    Case,
    Method,
    cfg_label,
    check_prompt_frac,
    method_list,
    now,
    use_clock,
)
from drpost.bench.system.floors import floor, scoring_check
from drpost.bench.system.flops import measure as measure_flops
from drpost.bench.system.memory import logits as logits_memory
from drpost.bench.system.memory import measure as measure_memory
from drpost.bench.system.report import GOALS, _jsonable, evaluate_goals, plot, write_markdown
from drpost.trainers.setup import resolve_device

BENCH_MODELS = ("tiny", "smollm2")


def _q(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure_case(cfg: dict, methods: list[Method], repeats: int, warmup: int, rates, device, log,
                 precision: str = "fp32") -> dict:
    """Warm-up, interleaved timed repeats, floors, the scoring check (tiny sizes only: on SmolLM2 it would time
    full ghost Grams and materialize the tied 49,152 x 576 embedding per row), then one memory step per method
    (``memory``) and one counted step per method (``flops``)."""
    case = Case(cfg["size"], cfg["mode"], cfg["T"], cfg["n"], cfg["m"], device, methods, precision=precision,
                prompt_frac=cfg.get("prompt_frac", 0.0))
    total_p, train_p = case.n_params()
    runs = {me.name: [] for me in methods}
    rng = random.Random(0)
    for _ in range(warmup):
        for me in methods:
            case.run(me)
    for _r in range(repeats):
        order = list(methods)
        rng.shuffle(order)
        for me in order:
            runs[me.name].append(case.run(me))
    std_runs = runs["standard"]
    std_tot = [sum(d.values()) for d in std_runs]
    t_std = {k: statistics.median(d.get(k, 0.0) for d in std_runs) for k in COMPONENTS}
    std_med = statistics.median(std_tot)
    rows = {}
    for me in methods:
        rs = runs[me.name]
        tot = [sum(d.values()) for d in rs]
        ratios = [a / b for a, b in zip(tot, std_tot)]
        comp = {k: statistics.median(d.get(k, 0.0) for d in rs) for k in COMPONENTS}
        excess = {k: comp[k] - t_std[k] for k in COMPONENTS}
        row = {
            "kind": me.kind, "kw": me.kw, "one_pass": me.one_pass,
            "total_s": statistics.median(tot), "ratio": statistics.median(ratios),
            "ratio_q25": _q(ratios, 0.25), "ratio_q75": _q(ratios, 0.75),
            "components_s": comp, "excess_s": excess,
            "held_back_by": max(excess, key=excess.get) if me.kind != "standard" else None,
        }
        fl = floor(case, me, t_std, rates)
        if fl is not None:
            row.update(fl)
            row["floor_ratio"] = fl["floor_s"] / std_med
            row["over_floor"] = row["total_s"] / fl["floor_s"]
        rep = case.reports.get(me.name)
        if rep is not None and rep.scoring:
            ch = {}
            for v in rep.scoring.values():
                ch[v] = ch.get(v, 0) + 1
            row["scoring_choices"] = ch
            row["streamed_blocks"] = len(rep.streamed)
        if me.kind == "func":
            row["func_mode"] = case.func_mode
        rows[me.name] = row
        log(f"    {me.name:36s} {row['ratio']:5.2f}x [{row['ratio_q25']:.2f}-{row['ratio_q75']:.2f}]"
            + (f"  floor {row['floor_ratio']:.2f}x" if "floor_ratio" in row else ""))
    sc = scoring_check(case, rates, max(1, min(3, repeats))) if cfg["size"] in SIZES else {}
    mem = measure_memory(case, methods)
    std_mem = mem["standard"]
    for me in methods:
        row = rows[me.name]
        row.update(mem[me.name])
        for k in ("peak_mem", "step_mem"):
            a, b = mem[me.name][f"{k}_bytes"], std_mem[f"{k}_bytes"]
            row[f"{k}_ratio"] = a / b if a and b else None
    arithmetic = measure_flops(case, methods)
    std_gflop = arithmetic["standard"]["gflop"]
    for me in methods:
        row = rows[me.name]
        row.update(arithmetic[me.name])
        row["flop_ratio"] = row["gflop"] / std_gflop if std_gflop else None
        row["rate_ratio"] = row["ratio"] / row["flop_ratio"] if row["flop_ratio"] else None
    lg = logits_memory(case)
    if std_mem["step_mem_bytes"]:
        lg["logits_over_standard_step_mem"] = lg["window_logits_bytes"] / std_mem["step_mem_bytes"]
    log("    step memory (MiB, x standard): " + ", ".join(
        f"{me.name} {_mb(mem[me.name]['step_mem_bytes'])} ({_x(rows[me.name]['step_mem_ratio'])})" for me in methods))
    return {"config": cfg, "params": total_p, "trainable": train_p, "standard_s": std_med,
            "standard_components_s": t_std, "methods": rows, "scoring_check": sc, "logits": lg}


def _mb(b) -> str:
    return "—" if b is None else f"{b / 2**20:.0f}"


def _x(r) -> str:
    return "—" if r is None else f"{r:.2f}x"


# --------------------------------------------------------------------------- crossovers
def _layer_block(p: int, q: int, R: int, T: int, device):
    from drpost.geometry.capture import Block, Use

    w = torch.nn.Parameter(torch.empty(p, q, device=device))
    a = torch.randn(R, T, q, device=device)  # (R, T, d_in)
    b = torch.randn(R, T, p, device=device)  # (R, T, d_out)
    return Block(name=f"linear{p}x{q}", factored={w: [Use(a, b, False)]}, params=[w])


def _time_scoring(block, method, n, R, repeats, device) -> float:
    from drpost.geometry.kernels import block_stats

    tc = torch.zeros(R, device=device)
    tc[n:] = 1.0 / (R - n)
    ts = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = now()
        block_stats(block, 0, method, tc, n, False, False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(now() - t0)
    return statistics.median(ts[1:])


def _measured_crossover(xs, ta, tb) -> float | None:
    """First x where method b becomes cheaper than a (log-linear interpolation); None if it never does."""
    d = [math.log(b / a) for a, b in zip(ta, tb)]
    for i in range(1, len(xs)):
        if d[i - 1] > 0 >= d[i]:
            f = d[i - 1] / (d[i - 1] - d[i])
            return math.exp(math.log(xs[i - 1]) + f * (math.log(xs[i]) - math.log(xs[i - 1])))
    return None


def _model_crossover(xs, ca, cb) -> float | None:
    return _measured_crossover(xs, ca, cb)


def crossovers(shape, m_sweep, T_m, T_sweep, n, repeats, rates, device) -> dict:
    from drpost.geometry import cost

    p, q = shape
    shapes = [(p, q, 1)]
    out = {"shape": [p, q], "n": n}
    # m-sweep: full ghost vs reduced ghost (scores only)
    fg, rg, mfg, mrg = [], [], [], []
    for m in m_sweep:
        blk = _layer_block(p, q, n + m, T_m, device)
        fg.append(_time_scoring(blk, "full_ghost", n, n + m, repeats, device))
        rg.append(_time_scoring(blk, "reduced_ghost", n, n + m, repeats, device))
        c = cost.method_costs(shapes, n, m, T_m, False, rates)
        mfg.append(c["full_ghost"])
        mrg.append(c["reduced_ghost"])
    out["m_sweep"] = {"T": T_m, "m": list(m_sweep), "full_ghost_s": fg, "reduced_ghost_s": rg,
                      "model_full_ghost_s": mfg, "model_reduced_ghost_s": mrg,
                      "analytic_m_star": cost.crossover_m(shapes, T_m),
                      "cost_model_m_star": _model_crossover(m_sweep, mfg, mrg),
                      "measured_m_star": _measured_crossover(m_sweep, fg, rg)}
    # T-sweep: reduced ghost vs direct (scores only, m = 1)
    rg2, dr, mrg2, mdr = [], [], [], []
    for T in T_sweep:
        blk = _layer_block(p, q, n + 1, T, device)
        rg2.append(_time_scoring(blk, "reduced_ghost", n, n + 1, repeats, device))
        dr.append(_time_scoring(blk, "direct", n, n + 1, repeats, device))
        c = cost.method_costs(shapes, n, 1, T, False, rates)
        mrg2.append(c["reduced_ghost"])
        mdr.append(c["direct"])
    out["T_sweep"] = {"m": 1, "T": list(T_sweep), "reduced_ghost_s": rg2, "direct_s": dr,
                      "model_reduced_ghost_s": mrg2, "model_direct_s": mdr,
                      "analytic_T_star": cost.crossover_T(shapes),
                      "cost_model_T_star": _model_crossover(T_sweep, mrg2, mdr),
                      "measured_T_star": _measured_crossover(T_sweep, rg2, dr)}
    return out


# --------------------------------------------------------------------------- grids
def grid(quick: bool, micro: bool = False, seq_lengths: list[int] | None = None,
         model: str = "tiny", batch_sizes: list[int] | None = None) -> tuple[list[dict], dict]:
    """(configurations, crossover settings). Each configuration: size, mode, T, n, m, methods ('all' | 'core').

    ``model``: ``tiny`` (the Llama sizes of ``SIZES``) or ``smollm2`` (``_smollm2_grid``). ``seq_lengths``: time
    every configuration at each of these lengths instead of its own T (duplicates dropped), and sweep them in the
    reduced-ghost vs direct crossover; None = the grid's own lengths. ``batch_sizes``: likewise for the number of
    general rows n (the crossovers keep theirs).
    """
    if model not in BENCH_MODELS:
        raise ValueError(f"option 'model' must be one of {BENCH_MODELS}, got {model!r}")
    cfgs, xcfg = _smollm2_grid(quick, micro) if model == "smollm2" else _grid(quick, micro)
    cfgs = _each(cfgs, "T", seq_lengths)
    cfgs = _each(cfgs, "n", batch_sizes)
    return cfgs, (dict(xcfg, T_sweep=sorted({int(T) for T in seq_lengths})) if seq_lengths else xcfg)


def _each(cfgs: list[dict], key: str, values: list[int] | None) -> list[dict]:
    """Every configuration at each of ``values`` of ``key`` (duplicates dropped, order kept); None = as they are."""
    if not values:
        return cfgs
    out: list[dict] = []
    for c in cfgs:
        for v in values:
            c2 = dict(c, **{key: int(v)})
            if c2 not in out:
                out.append(c2)
    return out


def _grid(quick: bool, micro: bool) -> tuple[list[dict], dict]:
    if micro:
        cfgs = [dict(size="micro", mode="full", T=16, n=4, m=1, methods="all")]
        return cfgs, dict(shape=(32, 32), m_sweep=[1, 4], T_m=8, T_sweep=[8, 32], n=4)
    base = dict(size="5M", T=64, n=8, m=1)
    cfgs = []
    for mode in ("full", "lora"):
        cfgs.append(dict(base, mode=mode, methods="all"))
    if quick:
        variants = [dict(size="1M"), dict(size="20M"), dict(T=256), dict(n=32), dict(m=4)]
        for mode in ("full", "lora"):
            for v in variants:
                cfgs.append(dict(base, mode=mode, methods="core", **v))
        return cfgs, dict(shape=(256, 256), m_sweep=[1, 2, 4, 8, 16, 32], T_m=32,
                          T_sweep=[32, 64, 128, 256, 512, 1024], n=8)
    for size in ("1M", "5M", "20M", "50M"):
        for mode in ("full", "lora"):
            for T in (64, 256):
                for n in (8, 32):
                    for m in (1, 4):
                        c = dict(size=size, mode=mode, T=T, n=n, m=m, methods="core")
                        if c != dict(base, mode=mode, methods="core"):
                            cfgs.append(c)
    for size in ("1M", "20M"):
        for mode in ("full", "lora"):
            cfgs.append(dict(size=size, mode=mode, T=64, n=8, m=1, methods="all"))
    return cfgs, dict(shape=(256, 256), m_sweep=[1, 2, 4, 8, 16, 32, 64], T_m=32,
                      T_sweep=[16, 32, 64, 128, 256, 512, 1024, 2048], n=8)


def _smollm2_grid(quick: bool, micro: bool) -> tuple[list[dict], dict]:
    """SmolLM2-135M shapes: full fine-tuning and LoRA r8 x T {64, 256} x n {8, 32}, m = 1, core methods; quick = T 64,
    n 8; micro = the 2-layer, 1,024-token ``smollm2-micro`` at T 16, n 8 (a smoke test of the same path). The
    crossovers use the MLP's 1536 x 576 shape."""
    x = dict(shape=(1536, 576), m_sweep=[1, 2, 4, 8, 16, 32], T_m=64, T_sweep=[64, 128, 256, 512, 1024], n=8)
    if micro:
        cfgs = [dict(size="smollm2-micro", mode=mode, T=16, n=8, m=1, methods="core") for mode in ("full", "lora")]
        return cfgs, dict(x, m_sweep=[1, 4], T_m=8, T_sweep=[8, 32], n=4)
    Ts, ns = ((64,), (8,)) if quick else ((64, 256), (8, 32))
    cfgs = [dict(size="smollm2", mode=mode, T=T, n=n, m=1, methods="core")
            for T, n in sorted(((T, n) for T in Ts for n in ns), key=lambda tn: tn[0] * (tn[1] + 1))
            for mode in ("full", "lora")]  # the cheapest configurations first: each is written when done
    return cfgs, x


def run_system_bench(out_dir: str | Path = "results/system", quick: bool = False, *, micro: bool = False,
                     repeats: int | None = None, warmup: int = 1, threads: int | None = 1,
                     device: str | None = None, command: str | None = None, log=print,
                     seq_lengths: list[int] | None = None, scorings: list[str] | None = None,
                     model: str = "tiny", clock: str = "wall", precision: str = "fp32", resume: bool = True,
                     prompt_frac: float = 0.0, batch_sizes: list[int] | None = None) -> dict:
    """Run the system benchmark and write ``system.json``, ``metrics.json``, ``summary.md`` and PNGs.

    quick: small grid for 2 CPU cores (~10 min); micro: one tiny configuration (tests); repeats: timed repeats per
    method (default 5 quick / 7 full / 1 micro; 3 for SmolLM2); threads: torch CPU threads (None = leave as is);
    seq_lengths, batch_sizes: see ``grid``; scorings: the scoring methods whose rows are timed (None = all, see
    ``method_list``); model: ``tiny`` or ``smollm2`` (see ``grid``); clock: ``wall`` or ``cpu`` (process CPU time,
    see ``cases.use_clock``; CUDA timings always use CUDA events); precision: ``fp32`` or ``bf16`` (every method's
    forward and backward under bf16 autocast, fp32 weights and optimizer; the floors use GEMM rates calibrated in
    bf16; the torch.func anchor is left out); resume: keep the configurations that a stopped run (``partial``) wrote
    to ``out_dir/system.json`` with the same settings, device, threads and clock, and measure only the others
    (``carried_cases``), so a grid of hours spans sittings; prompt_frac: the share of each row's leading tokens
    that are a prompt without labels (``cases.prompt_tokens``), so the loss and the LM head run on the window after
    it: every configuration is then timed twice, back to back, without and with the prompt, and ``summary.md``
    compares the pairs (0 = every position a label, once)."""
    from drpost.geometry import cost

    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device or "auto")
    command = command or (f"drpost bench system{' model=' + model if model != 'tiny' else ''}"
                          f"{' quick=true' if quick else ''}{' micro=true' if micro else ''}"
                          f"{' precision=bf16' if precision == 'bf16' else ''}"
                          f"{f' prompt_frac={prompt_frac:g}' if prompt_frac else ''} output_dir={out_dir}")
    check_prompt_frac(prompt_frac)  # refused before anything runs
    use_clock(clock)
    old_threads = torch.get_num_threads()
    if threads and dev.type == "cpu":
        torch.set_num_threads(threads)
    try:
        rates = cost.calibrate(str(dev) if dev.type == "cuda" else "cpu", repeats=7,
                               dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
        cfgs, xcfg = grid(quick, micro, seq_lengths, model, batch_sizes)
        if prompt_frac:  # each configuration twice, back to back: every position a label, then the prompt
            cfgs = [c2 for c in cfgs for c2 in (c, dict(c, prompt_frac=float(prompt_frac)))]
        reps = repeats or (1 if micro else 3 if model == "smollm2" else 5 if quick else 7)
        all_methods = [m for m in method_list(scorings=scorings) if precision == "fp32" or m.kind != "func"]
        res = {
            "machine": machine_record(dev, threads=threads if dev.type == "cpu" else None,
                                      clock="cuda_events" if dev.type == "cuda" else clock, rates=rates),
            "settings": {"model": model, "precision": precision, "quick": quick, "micro": micro, "repeats": reps,
                         "warmup": warmup, "prompt_frac": prompt_frac,
                         "lr": LR, "vocab": VOCAB, "seq_lengths": seq_lengths, "scorings": scorings,
                         # only when given: the settings of runs made before the option stay equal (resume)
                         **({"batch_sizes": batch_sizes} if batch_sizes else {}),
                         "sizes": {k: list(v) for k, v in SIZES.items()}, "smollm2": SMOLLM2, "goals": GOALS},
            "cases": [],
            "crossovers": None,
            "partial": True,
        }
        done = {json.dumps(c["config"], sort_keys=True): c for c in (carried_cases(out, res) if resume else [])}
        keys = [json.dumps(_jsonable(cf), sort_keys=True) for cf in cfgs]
        res["carried_cases"] = 0
        for i, cf in enumerate(cfgs):
            old_case = done.get(keys[i])
            if old_case is not None:
                log(f"[{i + 1}/{len(cfgs)}] {cfg_label(cf)}: measured by the stopped run, kept")
                res["cases"].append(old_case)
                res["carried_cases"] += 1
                continue
            ms = all_methods if cf["methods"] == "all" else [m for m in all_methods if m.core]
            r = reps if cf["methods"] == "all" or model != "tiny" else max(1, reps - 2 if quick else reps)
            log(f"[{i + 1}/{len(cfgs)}] {cfg_label(cf)}: {len(ms)} methods x {r} repeats")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res["cases"].append(measure_case(cf, ms, r, warmup, rates, dev, log, precision))
            # what has run so far survives a later crash (e.g. out of memory), and so do the stopped run's
            # configurations that come later in the grid
            later = [done[k] for k in keys[i + 1:] if k in done]
            _write(dict(res, cases=res["cases"] + later), out, command, t_start)
        log("crossovers")
        res["crossovers"] = crossovers(xcfg["shape"], xcfg["m_sweep"], xcfg["T_m"], xcfg["T_sweep"], xcfg["n"],
                                       max(3, reps), rates, dev)
    finally:
        torch.set_num_threads(old_threads)
        use_clock("wall")
    del res["partial"]
    _write(res, out, command, t_start)
    plot(res, out)
    log(f"wrote {out}/system.json, summary.md, breakdown.png, crossovers.png in {res['wall_s']:.0f} s")
    return res


def carried_cases(out: Path, res: dict) -> list[dict]:
    """The cases in ``out/system.json`` when a stopped run (``partial``) wrote it with ``res``'s settings and on the
    same device, CPU, torch threads and clock; [] otherwise (none there, finished, or measured another way)."""
    path = out / "system.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    same_machine = all(old.get("machine", {}).get(k) == res["machine"].get(k)
                       for k in ("device", "cpu_model", "torch_threads", "clock"))
    same = old.get("settings") == json.loads(json.dumps(_jsonable(res["settings"])))
    return list(old.get("cases", [])) if old.get("partial") and same and same_machine else []


def _write(res: dict, out: Path, command: str, t_start: float) -> None:
    """system.json, metrics.json and summary.md of the configurations measured so far (``res['partial']`` until the
    crossovers are in)."""
    res["goals"] = evaluate_goals(res["cases"])
    res["wall_s"] = time.perf_counter() - t_start
    (out / "system.json").write_text(json.dumps(_jsonable(res), indent=1))
    head = {g["goal"] + " | " + g["config"] + " | " + g["method"]: {"value": g["value"], "met": g["met"]}
            for g in res["goals"]}
    (out / "metrics.json").write_text(json.dumps(_jsonable({"goals": head, "wall_s": res["wall_s"]}), indent=1))
    write_markdown(res, out / "summary.md", command)


def run(config) -> int:
    """CLI runner (``drpost bench system``): ``config`` is a ``drpost.config.BenchSystemConfig`` (or any object or
    dict with some of its keys: output_dir (or out_dir), model, quick, micro, repeats, threads, device,
    seq_lengths, batch_sizes, scorings, clock, precision, resume, prompt_frac)."""
    get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else (
        lambda k, d=None: getattr(config, k, d))
    out_dir = get("out_dir") or get("output_dir") or "results/system"
    dev = str(resolve_device(get("device") or "auto"))  # a CUDA device without CUDA is refused naming the option
    threads = get("threads", 1)
    command = "drpost " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("drpost") \
        else f"drpost bench system output_dir={out_dir}"
    run_system_bench(out_dir, quick=bool(get("quick", False)), micro=bool(get("micro", False)),
                     repeats=get("repeats"), threads=threads or None, device=dev, command=command,
                     seq_lengths=get("seq_lengths"), scorings=get("scorings"), model=get("model") or "tiny",
                     clock=get("clock") or "wall", precision=get("precision") or "fp32",
                     resume=bool(get("resume", True)), prompt_frac=float(get("prompt_frac", 0.0) or 0.0),
                     batch_sizes=get("batch_sizes"))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m drpost.bench.system ARGS`` = ``drpost bench system ARGS`` (one command line, the CLI's)."""
    from drpost.cli import main as cli_main

    return cli_main(["bench", "system", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
