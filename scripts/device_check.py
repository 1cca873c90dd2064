#!/usr/bin/env python
"""One prepared device check (the GPU rows of the performance issue): exactness of the engine, mixed precision and
the SmolLM2 step cost, on one accelerator, in one command that stays inside a time budget.

Parts (``--parts``, run in this order by default):

* ``exact``: tiny architectures of ``tests/geometry/zoo.py`` (Llama, GPT-2, Gemma 1/2, Mistral, Qwen2, Phi-3,
  Mixtral, Qwen2-MoE, Qwen3-MoE; full fine-tuning and LoRA), model and batches on the device, in float64 where
  the device has it: one ``DataRegularizer`` step per variant against the per-row autograd oracle run on the same
  device (``zoo.check``). Records the relative errors of ``.grad`` / scores / weights / losses per (arch, variant);
  ``exact`` = at most ``zoo.EXACT`` (1e-6). A ``refused`` cell raised ``UnsupportedModelError``; ``listed`` says
  whether ``tests/geometry/test_architectures.py`` expects that refusal.
* ``mixed``: the cases of ``tests/geometry/test_mixed_precision.py`` on the device (bf16 autocast with the backward
  outside / inside the region, bf16 weights, fp16 autocast with the loss scaled by 1024) plus fp16 autocast with a
  real ``torch.amp.GradScaler`` (scale, step, ``unscale_``), each against the float32 step on the device, with that
  file's tolerance: ``.grad`` and scores within 2e-2 relative (5e-2 for ``.grad`` of layerwise_subset).
* ``system``: ``drpost bench system model=smollm2 quick=true device=D precision=P`` in a child process, for P in
  bf16 and fp32 (CUDA events on CUDA; ``max_memory_allocated`` peaks); the Dr/plain ratios, peak memory and the
  goals of both precisions side by side. ``--device cpu --quick`` runs ``model=tiny micro=true`` instead (seconds;
  SmolLM2-micro in bf16 takes minutes on CPUs that emulate bf16).

Budget: no part or item starts once ``--budget-s`` (default 480) seconds have passed since the start; what was not
run is listed under ``skipped``; a benchmark child is killed at ``--hard-s`` (default 560). The JSON is rewritten
after every item, so a run killed from outside leaves what it had measured.

Output (``--out``; default ``$OUT`` if set, else ``runs/device_check``), at most 5 files, no sub-folders:
``device_check.json`` (every number), ``device_check.md`` (summary), ``device_check.log`` (progress lines) and
``system_<precision>.md`` (each benchmark's own summary.md).

Run (repository root, after ``pip install -e .``):

    python scripts/device_check.py                       # cuda if available; writes $OUT or runs/device_check
    python scripts/device_check.py --device cpu --quick --out /tmp/dc    # CPU smoke (tests/test_device_check.py)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this tree's drpost (installed or not) and `tests` (the zoo and the tiny models), also in the benchmark children
for _p in (str(ROOT), str(ROOT / "src")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

# --------------------------------------------------------------------------- what is checked
ARCHS = ["llama", "gpt2", "gemma", "gemma2", "mistral", "qwen2", "phi3", "mixtral", "qwen2_moe", "qwen3_moe"]
QUICK_ARCHS = ["llama", "gpt2", "mixtral"]
# tests/geometry/test_mixed_precision.py (tests/test_device_check.py asserts these equal that file's)
MP_SCALE = 1024.0
MP_METHODS = [("full_training", {}), ("global_subset", {"frac": 0.5}), ("layerwise_subset", {"frac": 0.5}),
              ("hull", {})]
MP_FAMILIES = ["llama", "gpt2"]
MP_MODES = ["autocast_forward", "autocast_both", "bf16_weights", "fp16_scaled", "fp16_gradscaler"]
MP_TOL = 2e-2  # .grad and scores vs the float32 step
MP_TOL_LAYERWISE = 5e-2  # .grad of layerwise_subset (a block whose top-k has a near tie may keep another row)
PRECISIONS = ["bf16", "fp32"]
PARTS = ["exact", "mixed", "system"]
FILES = ("device_check.json", "device_check.md", "device_check.log")


class Run:
    """Elapsed-time budget, progress log and the JSON written after every item."""

    def __init__(self, out: Path, budget_s: float, hard_s: float, meta: dict):
        self.out, self.budget_s, self.hard_s = out, budget_s, hard_s
        self.t0 = time.perf_counter()
        self.res = {"meta": meta, "parts": {}, "skipped": [], "errors": []}
        self._log = open(out / "device_check.log", "w")  # noqa: SIM115 - kept open for the whole run

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over(self) -> bool:
        return self.elapsed() > self.budget_s

    def log(self, msg: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {msg}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def skip(self, part: str, item: str, reason: str = "") -> None:
        reason = reason or f"budget: {self.elapsed():.0f} s elapsed > --budget-s {self.budget_s:.0f}"
        self.res["skipped"].append({"part": part, "item": item, "reason": reason})

    def error(self, part: str, item: str, e: BaseException) -> str:
        msg = f"{type(e).__name__}: {_first(e)}"
        self.res["errors"].append({"part": part, "item": item, "error": msg,
                                   "where": traceback.format_exc(limit=-3)[-1500:]})
        self.log(f"  ERROR {part} {item}: {msg}")
        return msg

    def close(self) -> None:
        self._log.close()

    def write(self) -> None:
        self.res["meta"]["wall_s"] = self.elapsed()
        (self.out / "device_check.json").write_text(json.dumps(_clean(self.res), indent=1, allow_nan=False))


def _first(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else "")[:300]


def _clean(x):
    """JSON-safe: tensors to lists, NaN (not applicable) to None, +-inf to the string 'inf' / '-inf'."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _clean(x.detach().cpu().tolist())
    if isinstance(x, float):
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
    return x


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _has_fp64(dev: torch.device) -> bool:
    try:
        torch.zeros(1, dtype=torch.float64, device=dev).sum().item()
        return True
    except (RuntimeError, TypeError):
        return False


def meta(dev: torch.device, args) -> dict:
    import transformers

    m = {"command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]) if sys.argv else "",
         "device": str(dev), "quick": args.quick, "budget_s": args.budget_s, "hard_s": args.hard_s,
         "parts": args.parts, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "platform": platform.platform(),
         "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
         "float32_matmul_precision": torch.get_float32_matmul_precision()}
    try:
        import peft

        m["peft"] = peft.__version__
    except ImportError:
        m["peft"] = None
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        m.update(device_name=p.name, capability=f"{p.major}.{p.minor}", device_memory_bytes=p.total_memory,
                 cuda=torch.version.cuda, bf16_supported=torch.cuda.is_bf16_supported(),
                 cuda_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                 cuda_matmul_bf16_reduced_precision_reduction=(
                     torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction),
                 cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    else:
        m.update(device_name=platform.processor() or platform.machine(), torch_threads=torch.get_num_threads())
    return m


# --------------------------------------------------------------------------- part 1: exactness on the device
def part_exact(run: Run, dev: torch.device, archs: list[str], quick: bool) -> dict:
    from tests.geometry import zoo

    try:  # the expected refusals (the test module imports pytest, which a bare install may lack)
        from tests.geometry.test_architectures import REFUSED
    except ImportError:
        REFUSED = None
    fp64 = _has_fp64(dev)
    variants = list(zoo.VARIANTS) + ([] if quick else list(zoo.EXTRA_VARIANTS))
    base = {v[0] for v in zoo.VARIANTS}
    part = {"threshold": zoo.EXACT, "dtype": "float64" if fp64 else "float32", "archs": archs,
            "variants": [v[0] for v in variants], "refusal_list_loaded": REFUSED is not None, "rows": []}
    run.res["parts"]["exact"] = part
    for t in archs:
        for name, lora, method, opts in variants:
            item = f"{t} {name}"
            if run.over():
                run.skip("exact", item)
                continue
            row = {"arch": t, "variant": name, "lora": lora, "method": method, "opts": opts}
            t1 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    built = zoo.build(t, lora=lora, device=dev if fp64 else "cpu")
                    if built.model is None:
                        row.update(status="skip", detail=built.skip)
                    else:
                        model = built.model if fp64 else built.model.to(device=dev, dtype=torch.float32)
                        row["mode"] = built.mode
                        try:
                            r = zoo.check(model, method, **opts)
                        except Exception as e:  # noqa: BLE001 - a refusal or an error, recorded
                            if zoo.is_refusal(e):
                                # the matrix lists the zoo's VARIANTS; an extra variant counts under its full/LoRA kin
                                kin = [name] if name in base else [v[0] for v in zoo.VARIANTS if v[1] == lora]
                                listed = None if REFUSED is None else any((t, k) in REFUSED for k in kin)
                                row.update(status="refused", listed=listed, detail=f"{type(e).__name__}: {_first(e)}")
                            else:
                                raise
                        else:
                            row.update(status=("exact" if r.exact else "WRONG") if fp64 else "measured",
                                       max_err=r.max_err, grad=r.grad, grad_param=r.grad_param,
                                       worst_param=r.worst_param, scores=r.scores, weights=r.weights, loss=r.loss,
                                       subset_ok=r.subset_ok, missing=r.missing)
                        del model, built
            except Exception as e:  # noqa: BLE001
                row.update(status="error", detail=run.error("exact", item, e))
            _sync(dev)
            row["seconds"] = time.perf_counter() - t1
            part["rows"].append(row)
            err = row.get("max_err")
            note = {True: " (listed in test_architectures.REFUSED)", False: " (NOT listed)"}.get(row.get("listed"), "")
            run.log(f"  exact {item:32s} {row['status']:8s}" + (f" max rel err {err:.1e}" if err is not None else "")
                    + (note if row["status"] == "refused" else f"  ({row['detail'][:90]})" if row.get("detail") else ""))
            run.write()
    rows = part["rows"]
    errs = [r["max_err"] for r in rows if r.get("max_err") is not None]
    part["counts"] = {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})}
    part["worst_max_err"] = max(errs) if errs else None
    part["ok"] = bool(rows) and all(r["status"] in ("exact", "skip", "measured") or
                                    (r["status"] == "refused" and r.get("listed") is not False) for r in rows)
    return part


# --------------------------------------------------------------------------- part 2: mixed precision
def _mp_loss(mode: str, dev_type: str, scaler=None):
    from drpost.objectives import causal_lm_loss

    def loss_fn(model, b):
        if mode in ("autocast_forward", "fp16_scaled", "fp16_gradscaler"):
            dt = torch.bfloat16 if mode == "autocast_forward" else torch.float16
            with torch.autocast(dev_type, dtype=dt):  # the backward runs after this region closes
                loss, counts = causal_lm_loss(model, b)
            if mode == "fp16_scaled":
                loss = loss * MP_SCALE
            elif mode == "fp16_gradscaler":
                loss = scaler.scale(loss)
            return loss, counts
        return causal_lm_loss(model, b)

    return loss_fn


def _mp_step(family: str, method: str, mode: str, dev: torch.device, opts: dict):
    """One step of ``tests/geometry/test_mixed_precision.py``'s ``_step`` on ``dev``: (flat .grad in float32,
    report, .grad dtypes match the weights', extra info)."""
    from tests.helpers import batch, tiny_model

    import drpost

    model = tiny_model(family, dtype=torch.float32, device=dev)
    if mode == "bf16_weights":
        model = model.to(torch.bfloat16)
    gen, tgt = batch(6, seed=1, T=9, device=dev), batch(2, seed=2, T=9, device=dev)
    scaler = opt = None
    info = {}
    if mode == "fp16_gradscaler":
        scaler = torch.amp.GradScaler(dev.type, init_scale=MP_SCALE)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    reg = drpost.DataRegularizer(model, method, **opts)
    if mode == "autocast_both":
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            rep = reg.step(gen, tgt, _mp_loss(mode, dev.type))
    else:
        rep = reg.step(gen, tgt, _mp_loss(mode, dev.type, scaler))
    if not rep:
        raise RuntimeError(f"step skipped: {rep.skip_reason}")
    dtype_ok = all(p.grad is None or p.grad.dtype == p.dtype for p in model.parameters())
    if scaler is not None:
        scaler.unscale_(opt)  # divides .grad by the scale in place and looks for inf/nan
        scaler.step(opt)  # lr 0: the weights stay; skipped where inf/nan was found
        scaler.update()  # halves the scale where inf/nan was found
        info["found_inf"] = scaler.get_scale() < MP_SCALE
    g = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).float().flatten()
                   for p in model.parameters() if p.requires_grad])
    if mode == "fp16_scaled":
        g = g / MP_SCALE
    return g, rep, dtype_ok, info


def _rel(a, b) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def part_mixed(run: Run, dev: torch.device, quick: bool) -> dict:
    part = {"tolerance": {"grad": MP_TOL, "grad_layerwise_subset": MP_TOL_LAYERWISE, "scores": MP_TOL},
            "scale": MP_SCALE, "reference": f"float32 step on {dev}", "rows": []}
    run.res["parts"]["mixed"] = part
    for family in MP_FAMILIES:
        refs = {}
        for mode in MP_MODES:
            for method, opts in MP_METHODS:
                item = f"{family} {mode} {method}"
                if run.over():
                    run.skip("mixed", item)
                    continue
                row = {"family": family, "mode": mode, "method": method}
                t1 = time.perf_counter()
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        if method not in refs:
                            refs[method] = _mp_step(family, method, "fp32", dev, opts)
                        ref, rep_ref = refs[method][:2]
                        got, rep, dtype_ok, info = _mp_step(family, method, mode, dev, opts)
                    tol = MP_TOL_LAYERWISE if method == "layerwise_subset" else MP_TOL
                    row.update(grad_rel=_rel(got, ref), tol_grad=tol, grad_dtype_ok=dtype_ok, **info)
                    ok = row["grad_rel"] <= tol and dtype_ok and bool(torch.isfinite(got).all())
                    if rep_ref.scores is not None and rep.scores is not None:
                        s = rep.scores / (MP_SCALE**2 if mode in ("fp16_scaled", "fp16_gradscaler") else 1.0)
                        row["scores_rel"] = _rel(s, rep_ref.scores)  # scores are bilinear in the loss scale
                        ok = ok and row["scores_rel"] <= MP_TOL
                    if method == "global_subset":
                        row["subset_same"] = bool(torch.equal((rep.weights != 0).cpu(), (rep_ref.weights != 0).cpu()))
                        ok = ok and row["subset_same"]
                    row["ok"] = ok
                except Exception as e:  # noqa: BLE001
                    row.update(ok=False, error=run.error("mixed", item, e))
                _sync(dev)
                row["seconds"] = time.perf_counter() - t1
                part["rows"].append(row)
                run.log(f"  mixed {item:44s} " + ("ok  " if row["ok"] else "FAIL")
                        + (f" grad {row['grad_rel']:.1e}" if "grad_rel" in row else "")
                        + (f" scores {row['scores_rel']:.1e}" if "scores_rel" in row else ""))
                run.write()
    rows = part["rows"]
    part["worst_grad_rel"] = max((r["grad_rel"] for r in rows if "grad_rel" in r), default=None)
    part["worst_scores_rel"] = max((r["scores_rel"] for r in rows if "scores_rel" in r), default=None)
    part["ok"] = bool(rows) and all(r["ok"] for r in rows)
    return part


# --------------------------------------------------------------------------- part 3: step cost (system benchmark)
def _bench_args(dev: torch.device, precision: str, quick: bool, grid: str, out: Path) -> list[str]:
    if dev.type == "cpu" and quick:  # seconds on CPU (SmolLM2-micro in bf16 takes minutes where bf16 is emulated)
        a = ["model=tiny", "micro=true", "scorings=auto"]
    else:
        a = ["model=smollm2"] + (["quick=true"] if grid == "quick" else [])
    return a + [f"device={dev}", f"precision={precision}", f"output_dir={out}"]


def _stream(proc, run: Run, tag: str) -> None:
    for line in proc.stdout:
        run.log(f"    [{tag}] {line.rstrip()}")


def _condense(sysres: dict) -> dict:
    from drpost.bench.system import cfg_label

    keep = ("ratio", "ratio_q25", "ratio_q75", "total_s", "floor_ratio", "held_back_by", "peak_mem_bytes",
            "step_mem_bytes", "peak_mem_ratio", "step_mem_ratio")
    cases = []
    for c in sysres.get("cases", []):
        cases.append({"config": cfg_label(c["config"]), "mode": c["config"]["mode"], "params": c.get("params"),
                      "trainable": c.get("trainable"), "standard_s": c.get("standard_s"),
                      "methods": {n: {k: r.get(k) for k in keep} for n, r in c["methods"].items()}})
    return {"machine": sysres.get("machine"), "settings": {k: sysres.get("settings", {}).get(k) for k in
                                                          ("model", "precision", "quick", "micro", "repeats")},
            "partial": bool(sysres.get("partial", False)), "bench_wall_s": sysres.get("wall_s"), "cases": cases,
            "goals": sysres.get("goals", []), "crossovers": sysres.get("crossovers")}


def part_system(run: Run, dev: torch.device, quick: bool, grid: str, precisions: list[str]) -> dict:
    part = {"runs": {}}
    run.res["parts"]["system"] = part
    if dev.type == "cuda":  # the children measure their own max_memory_allocated; hand this process's cache back
        torch.cuda.empty_cache()
    tmp = Path(tempfile.mkdtemp(prefix="device_check_sys_"))
    try:
        for prec in precisions:
            if run.over():
                run.skip("system", prec)
                continue
            timeout = run.hard_s - run.elapsed()
            if timeout < 5:
                run.skip("system", prec, f"{run.elapsed():.0f} s elapsed: under 5 s left before --hard-s {run.hard_s:.0f}")
                continue
            bench_out = tmp / prec
            args = _bench_args(dev, prec, quick, grid, bench_out)
            cmd = [sys.executable, "-m", "drpost.bench.system", *args]
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
            r = {"command": "drpost bench system " + " ".join(a for a in args if not a.startswith("output_dir")),
                 "timeout_s": timeout}
            run.log(f"  system {prec}: {r['command']} (child, killed after {timeout:.0f} s)")
            t1 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)
            reader = threading.Thread(target=_stream, args=(proc, run, f"bench {prec}"), daemon=True)
            reader.start()
            try:
                r["rc"] = proc.wait(timeout=timeout)
                r["timed_out"] = False
            except subprocess.TimeoutExpired:
                proc.kill()  # this script's own child, by its handle
                r["rc"], r["timed_out"] = proc.wait(), True
                run.skip("system", f"{prec} (rest of the grid)", f"the benchmark child ran past --hard-s {run.hard_s:.0f}")
            reader.join(timeout=5)
            r["seconds"] = time.perf_counter() - t1
            sj = bench_out / "system.json"
            if sj.exists():
                r.update(_condense(json.loads(sj.read_text())))
                shutil.copy(bench_out / "summary.md", run.out / f"system_{prec}.md")
            else:
                run.res["errors"].append({"part": "system", "item": prec, "error": f"no system.json (rc {r['rc']})"})
            part["runs"][prec] = r
            run.log(f"  system {prec}: rc {r['rc']} in {r['seconds']:.0f} s")
            run.write()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    part["table"] = _ratio_table(part["runs"])
    part["goals_met"] = {p: f"{sum(bool(g['met']) for g in r.get('goals', []))}/{len(r.get('goals', []))}"
                         for p, r in part["runs"].items()}
    part["ok"] = bool(part["runs"]) and all(r.get("rc") == 0 and r.get("cases") for r in part["runs"].values())
    return part


def _ratio_table(runs: dict) -> list[dict]:
    """One row per (configuration, method): the Dr/plain ratio and peak memory of every precision."""
    rows: dict[tuple, dict] = {}
    for prec, r in runs.items():
        for c in r.get("cases", []):
            for name, m in c["methods"].items():
                row = rows.setdefault((c["config"], name), {"config": c["config"], "method": name})
                row[f"ratio_{prec}"] = m.get("ratio")
                row[f"peak_mem_bytes_{prec}"] = m.get("peak_mem_bytes")
                row[f"peak_mem_ratio_{prec}"] = m.get("peak_mem_ratio")
                row[f"total_s_{prec}"] = m.get("total_s")
    for row in rows.values():
        if row.get("ratio_bf16") is not None and row.get("ratio_fp32"):
            row["ratio_bf16_over_fp32"] = row["ratio_bf16"] / row["ratio_fp32"]
    return list(rows.values())


# --------------------------------------------------------------------------- summary
def _f(x, fmt=".2f") -> str:
    return "—" if not isinstance(x, (int, float)) or isinstance(x, bool) else format(x, fmt)


def write_markdown(run: Run) -> None:
    res = run.res
    m, parts = res["meta"], res["parts"]
    L = ["# Device check (`scripts/device_check.py`)", "",
         f"Command: `{m.get('command')}`", "",
         f"Device {m['device']} ({m.get('device_name')}), torch {m['torch']}, transformers {m['transformers']}, "
         f"{'quick, ' if m['quick'] else ''}budget {m['budget_s']:.0f} s, wall {m.get('wall_s', 0):.0f} s.", ""]
    ex = parts.get("exact")
    if ex:
        L += ["## Exactness on the device", "",
              f"{ex['dtype']}, per-row autograd oracle on the same device, exact = max relative error <= "
              f"{ex['threshold']:.0e}. Counts: {ex.get('counts')}; worst {_f(ex.get('worst_max_err'), '.1e')}; "
              f"ok: {ex.get('ok')}.", "", "| arch | variant | status | max rel err | s |", "|---|---|---|---|---|"]
        for r in ex["rows"]:
            st = r["status"] + ("" if r["status"] != "refused" else " (listed)" if r.get("listed") else " (unlisted)")
            L.append(f"| {r['arch']} | {r['variant']} | {st} | {_f(r.get('max_err'), '.1e')} | {_f(r['seconds'])} |")
        L.append("")
    mx = parts.get("mixed")
    if mx:
        L += ["## Mixed precision vs the float32 step on the device", "",
              f"Tolerance: .grad {mx['tolerance']['grad']} ({mx['tolerance']['grad_layerwise_subset']} layerwise), "
              f"scores {mx['tolerance']['scores']}. Worst .grad {_f(mx.get('worst_grad_rel'), '.1e')}, worst scores "
              f"{_f(mx.get('worst_scores_rel'), '.1e')}; ok: {mx.get('ok')}.", "",
              "| family | mode | method | .grad rel | scores rel | ok |", "|---|---|---|---|---|---|"]
        for r in mx["rows"]:
            L.append(f"| {r['family']} | {r['mode']} | {r['method']} | {_f(r.get('grad_rel'), '.1e')} | "
                     f"{_f(r.get('scores_rel'), '.1e')} | {'yes' if r['ok'] else 'NO ' + r.get('error', '')[:60]} |")
        L.append("")
    sy = parts.get("system")
    if sy:
        L += ["## Step cost (Dr / plain step ratio, peak memory)", ""]
        for p, r in sy["runs"].items():
            mach = r.get("machine") or {}
            L.append(f"* {p}: `{r['command']}` rc {r.get('rc')}, {_f(r.get('seconds'), '.0f')} s, clock "
                     f"{mach.get('clock')}, goals met {sy.get('goals_met', {}).get(p)}"
                     + (" (partial)" if r.get("partial") else "") + f"; full summary: `system_{p}.md`")
        L += ["", "| config | method | ratio fp32 | ratio bf16 | peak MiB fp32 | peak MiB bf16 |",
              "|---|---|---|---|---|---|"]
        for row in sy.get("table", []):
            mib = lambda b: _f(b / 2**20, ".0f") if isinstance(b, (int, float)) else "—"  # noqa: E731
            L.append(f"| {row['config']} | {row['method']} | {_f(row.get('ratio_fp32'))} | "
                     f"{_f(row.get('ratio_bf16'))} | {mib(row.get('peak_mem_bytes_fp32'))} | "
                     f"{mib(row.get('peak_mem_bytes_bf16'))} |")
        L.append("")
    if res["skipped"]:
        L += ["## Skipped", ""] + [f"* {s['part']} {s['item']}: {s['reason']}" for s in res["skipped"]] + [""]
    if res["errors"]:
        L += ["## Errors", ""] + [f"* {e['part']} {e['item']}: {e['error']}" for e in res["errors"]] + [""]
    (run.out / "device_check.md").write_text("\n".join(L))


# --------------------------------------------------------------------------- main
def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    ap.add_argument("--out", default=None, help="output folder (default: $OUT if set, else runs/device_check)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke mode: archs {','.join(QUICK_ARCHS)}, the zoo's 3 variants, the bench in micro on CPU")
    ap.add_argument("--budget-s", type=float, default=480.0, help="start no part or item after this many seconds")
    ap.add_argument("--hard-s", type=float, default=560.0, help="kill a benchmark child at this elapsed time")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list, run in this order (from {PARTS})")
    ap.add_argument("--archs", default=None,
                    help="comma list of zoo model types, or 'all' (every causal-LM type; budget-limited); "
                         f"default {','.join(ARCHS)} ({','.join(QUICK_ARCHS)} with --quick)")
    ap.add_argument("--system-grid", choices=("quick", "full"), default="quick",
                    help="SmolLM2 grid: quick = T 64, n 8 (full and LoRA); full = T 64/256 x n 8/32")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="benchmark precisions, in order")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {dev}: this torch ({torch.__version__}) has no CUDA device")
    out = Path(args.out or os.environ.get("OUT") or "runs/device_check")
    out.mkdir(parents=True, exist_ok=True)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise SystemExit(f"--parts: unknown {bad}; known {PARTS}")
    if args.archs == "all":
        from tests.geometry import zoo

        archs = zoo.model_types()
    else:
        archs = args.archs.split(",") if args.archs else (QUICK_ARCHS if args.quick else ARCHS)
    run = Run(out, args.budget_s, args.hard_s, meta(dev, args))
    run.log(f"device check on {dev} ({run.res['meta'].get('device_name')}), parts {parts}, out {out}")
    run.write()
    for p in parts:
        if run.over():
            run.skip(p, "(whole part)")
            run.log(f"part {p}: skipped (budget)")
            continue
        run.log(f"part {p}")
        t1 = time.perf_counter()
        try:
            if p == "exact":
                res = part_exact(run, dev, archs, args.quick)
            elif p == "mixed":
                res = part_mixed(run, dev, args.quick)
            else:
                res = part_system(run, dev, args.quick, args.system_grid,
                                  [x.strip() for x in args.precisions.split(",") if x.strip()])
            res["seconds"] = time.perf_counter() - t1
            run.log(f"part {p}: ok={res.get('ok')} in {res['seconds']:.0f} s")
        except Exception as e:  # noqa: BLE001 - the other parts still run
            run.res["parts"].setdefault(p, {})["ok"] = False
            run.error(p, "(part)", e)
        run.write()
        write_markdown(run)
    run.res["meta"]["ok"] = all(run.res["parts"].get(p, {}).get("ok") for p in parts) and not run.res["skipped"]
    run.write()
    write_markdown(run)
    run.log(f"wrote {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))} to {out}; "
            f"ok={run.res['meta']['ok']}")
    run.close()
    return 0


if __name__ == "__main__":
    import transformers

    transformers.logging.set_verbosity_error()  # the tiny models' load reports; warnings are ignored per item
    raise SystemExit(main())
