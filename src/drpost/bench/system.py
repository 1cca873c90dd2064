"""System benchmark: per-component cost of one data-regularized step, analytic floors, scoring crossovers.

This file owns ``drpost bench system``. For each configuration (tiny Llama size, sequence length T, n general rows,
m target rows, full fine-tuning or LoRA r=8) it times one training step of every method, split into forward,
activation backward, scoring, feasible-set solve, update assembly and optimizer step, and reports each as a ratio
to a standard step (plain token-mean forward/backward + AdamW) on the same union batch of n + m rows. Beside each
one-pass measurement it prints an analytic floor: the measured standard step, minus the weight-gradient GEMMs the
one-pass backward skips, plus one assembly GEMM per layer over the rows that carry weight, plus the FLOPs/bytes of
the scoring method chosen per block at the machine's measured GEMM rate and bandwidth (``cost.calibrate``). It also
checks ``scoring="auto"`` against the best fixed exact method, and measures the two scoring crossovers
(full vs reduced ghost over m; reduced ghost vs direct over T) on one layer shape against the analytic formulas.

Run:
    .venv/bin/python -m drpost.bench.system --quick --out results/system     # ~10 min on 2 CPU cores
    drpost bench system output_dir=results/system                            # through the CLI (run(config))

Timing: CPU = one thread by default (2 shared cores make multi-threaded timings 3-4x noisier), warm-up, then
repeats interleaved round-robin over the methods (drift hits all alike); median and IQR of per-repeat ratios.
CUDA = CUDA events per component and peak memory per method.
Writes ``system.json``, ``metrics.json``, ``summary.md``, ``breakdown.png``, ``crossovers.png`` under ``out_dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

COMPONENTS = ("forward", "backward", "scoring", "solve", "assembly", "optimizer")
VOCAB = 512
LR = 1e-5
# tiny Llama shapes: (hidden, intermediate, layers, heads) -> ~params with vocab 512, untied head
SIZES = {
    "micro": (32, 64, 1, 2),
    "1M": (128, 352, 4, 2),
    "5M": (256, 688, 6, 4),
    "20M": (512, 1376, 6, 8),
    "50M": (640, 1728, 10, 10),
}
GOALS = {
    "lora_one_pass_auto": 1.10,
    "full_one_pass_compress": 1.10,
    "full_one_pass_exact": 1.25,
    "floor_gap": 1.10,
    "convex_exact": 1.50,
    "auto_vs_best": 1.05,
}


# --------------------------------------------------------------------------- methods
@dataclass
class Method:
    name: str
    kind: str  # "standard" | "dr" | "func"
    kw: dict = field(default_factory=dict)
    core: bool = False  # also run in the sweep configurations

    @property
    def one_pass(self) -> bool:
        return self.kind == "dr" and self.kw.get("assembly", "one_pass") == "one_pass"


def method_list(include_convex: bool = True) -> list[Method]:
    lw, gs = "layerwise_subset", "global_subset"
    ms = [
        Method("standard", "standard", core=True),
        Method("full_training", "dr", dict(method="full_training"), core=True),
        Method("global/one_pass/auto", "dr", dict(method=gs, frac=0.5), core=True),
        Method("global/two_pass/auto", "dr", dict(method=gs, frac=0.5, assembly="two_pass")),
        Method("layerwise/one_pass/auto", "dr", dict(method=lw, frac=0.5), core=True),
        Method("layerwise/one_pass/autotune", "dr", dict(method=lw, frac=0.5, autotune=True)),
        Method("layerwise/one_pass/full_ghost", "dr", dict(method=lw, frac=0.5, scoring="full_ghost")),
        Method("layerwise/one_pass/reduced_ghost", "dr", dict(method=lw, frac=0.5, scoring="reduced_ghost")),
        Method("layerwise/one_pass/direct", "dr", dict(method=lw, frac=0.5, scoring="direct")),
        Method("layerwise/one_pass/compress", "dr", dict(method=lw, frac=0.5, scoring="compress"), core=True),
        Method("global/one_pass/compress", "dr", dict(method=gs, frac=0.5, scoring="compress")),
        Method("layerwise/two_pass/auto", "dr", dict(method=lw, frac=0.5, assembly="two_pass")),
        Method("greats/two_pass (greedy)", "dr", dict(method=gs, frac=0.5, selection="greedy", assembly="two_pass")),
        Method("torch.func vmap (layerwise topk)", "func"),
    ]
    if include_convex:
        try:
            import drpost.feasible.convex  # noqa: F401

            ms.insert(10, Method("hull/one_pass/auto (exact Gram)", "dr", dict(method="hull"), core=True))
            ms.insert(11, Method("hull/one_pass/compress", "dr", dict(method="hull", scoring="compress")))
        except ImportError:  # the convex family is optional here
            pass
    return ms


# --------------------------------------------------------------------------- models and batches
def build_model(size: str, mode: str, T: int, device, seed: int = 0, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, inter, layers, heads = SIZES[size]
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=VOCAB, max_position_embeddings=max(1024, T),
                      tie_word_embeddings=False, attn_implementation=attn)
    model = LlamaForCausalLM(cfg).to(device)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
        with torch.no_grad():  # LoRA B starts at zero: make the adapters' gradients generic
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    model.train()
    return model


def make_batch(rows: int, T: int, seed: int, device) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, T), generator=g)  # (rows, T)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": ids.clone().to(device)}


# --------------------------------------------------------------------------- clocks
class Clock:
    """Component timer: perf_counter on CPU; CUDA events on GPU (read after one sync at the end)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def start(self):
        self.marks = [("start", self._now())]

    def mark(self, name: str):
        self.marks.append((name, self._now()))

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def read(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            out[name] = out.get(name, 0.0) + (a.elapsed_time(b) / 1e3 if self.cuda else b - a)
        return out


# --------------------------------------------------------------------------- one case
class Case:
    """One configuration: model, batches, optimizer and a runner per method."""

    def __init__(self, size, mode, T, n, m, device, methods: list[Method], sketch="64x64"):
        from drpost.step import merge_batches

        self.size, self.mode, self.T, self.n, self.m = size, mode, T, n, m
        self.device = torch.device(device)
        self.model = build_model(size, mode, T, device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR)
        self.gen, self.tgt = make_batch(n, T, 1, device), make_batch(m, T, 2, device)
        self.merged = merge_batches(self.gen, self.tgt, device)
        self.methods = methods
        self.regs = {}
        self.reports = {}
        self.sketch = sketch
        self.func_mode = None
        import drpost

        for me in methods:
            if me.kind == "dr":
                self.regs[me.name] = drpost.DataRegularizer(self.model, sketch=sketch, optimizer=self.opt, **me.kw)

    def n_params(self) -> tuple[int, int]:
        total = sum(p.numel() for p in self.model.parameters())
        return total, sum(p.numel() for p in self.params)

    # ---- runners: each returns {component: seconds}
    def _opt_step(self, clock):
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        clock.mark("optimizer")

    def run_standard(self):
        from drpost.objectives import causal_lm_loss

        clock = Clock(self.device)
        clock.start()
        loss, counts = causal_lm_loss(self.model, self.merged)
        clock.mark("forward")
        (loss.sum() / counts.sum()).backward()
        clock.mark("backward")
        self._opt_step(clock)
        return clock.read()

    def run_dr(self, name):
        from drpost.objectives import causal_lm_loss

        reg = self.regs[name]
        rep = reg.step(self.gen, self.tgt, causal_lm_loss, lr=1e-3)
        self.reports[name] = rep
        t = {k: float(rep.timings.get(k, 0.0)) for k in COMPONENTS if k != "optimizer"}
        clock = Clock(self.device)
        clock.start()
        self._opt_step(clock)
        t.update(clock.read())
        return t

    def run_func(self):
        """torch.func anchor: per-sample grads of every row by vmap(grad), scores, per-tensor top-k, weighted sum."""
        from drpost.geometry.oracle import per_sample_grads
        from drpost.objectives import causal_lm_loss

        clock = Clock(self.device)
        clock.start()
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        ids, labels = self.merged["input_ids"], self.merged["labels"]
        grads = None
        if self.func_mode in (None, "vmap"):
            try:
                grads = self._vmap_grads(names, ids, labels)
                self.func_mode = "vmap"
            except Exception as e:  # noqa: BLE001 - fall back to the oracle loop
                warnings.warn(f"torch.func vmap failed ({type(e).__name__}: {e}); using oracle.per_sample_grads",
                              stacklevel=2)
                self.func_mode = "oracle"
        if grads is None:
            g, _ = per_sample_grads(self.model, self.merged, causal_lm_loss)
            grads = [g[k] for k in names]
        clock.mark("backward")
        n = self.n
        counts_t = (labels[n:, 1:] != -100).sum()
        picks = []
        for g in grads:  # g: (R, *shape)
            f = g.reshape(g.shape[0], -1)  # (R, P)
            gt = f[n:].sum(0) / counts_t  # (P,)  token-mean target gradient
            picks.append(f[:n] @ gt)  # (n,)
        clock.mark("scoring")
        k = max(1, n // 2)
        masks = [torch.zeros(n, device=s.device).scatter_(0, torch.topk(s, k).indices, 1.0) for s in picks]
        clock.mark("solve")
        counts = (labels[:n, 1:] != -100).sum(1).to(grads[0].dtype)  # (n,)
        for p_name, g, w in zip(names, grads, masks):
            c = w / (w @ counts)  # (n,)
            p = dict(self.model.named_parameters())[p_name]
            p.grad = torch.tensordot(c.to(g.dtype), g[:n], dims=1).to(p.dtype)
        clock.mark("assembly")
        self._opt_step(clock)
        return clock.read()

    def _vmap_grads(self, names, ids, labels):
        model = self.model
        params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
        frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}

        def f(ps, x, y):
            out = torch.func.functional_call(model, {**frozen, **ps}, (x[None],), {})
            logits = out.logits if hasattr(out, "logits") else out[0]  # (1, T, V)
            return torch.nn.functional.cross_entropy(logits[0, :-1].float(), y[1:], reduction="sum",
                                                     ignore_index=-100)

        g = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))(params, ids, labels)
        return [g[k] for k in names]

    def run(self, me: Method):
        if me.kind == "standard":
            return self.run_standard()
        if me.kind == "func":
            return self.run_func()
        return self.run_dr(me.name)

    # ---- floors
    def shapes(self, reg) -> list[list[tuple[int, int, int]]]:
        """Per block: (p, q, uses) of each factored weight (one use each: the benchmark models are untied)."""
        return [[(p.shape[0], p.numel() // p.shape[0], 1) for p in b.factored] for b in reg.capture.blocks]

    def floor(self, me: Method, t_std: dict[str, float], rates) -> dict | None:
        """Analytic floor (seconds) of a regularizer method next to its measurement; None for others."""
        from drpost.geometry import cost

        if me.kind != "dr" or me.name not in self.reports:
            return None
        reg, rep = self.regs[me.name], self.reports[me.name]
        if rep.skipped:
            return None
        shapes = self.shapes(reg)
        n, m, T = self.n, self.m, self.T
        R = n + m
        need_gram, need_tgram, trivial = reg._needs()
        std = sum(t_std.values())
        score = 0.0
        for l, b in enumerate(reg.capture.blocks):
            meth = rep.scoring.get(b.name)
            if trivial or not shapes[l] or meth is None:
                continue
            if meth == "compress":
                score += cost.compress_seconds(shapes[l], n, m, T, *reg.sketch, need_gram, rates)
            else:
                score += cost.method_costs(shapes[l], n, m, T, need_gram or need_tgram, rates)[meth]
        w = rep.weights  # (L', n)
        tw = rep.target_weight
        L = len(shapes)
        kept = []
        for l in range(L):
            wl = w[l if w.shape[0] > 1 else 0]
            tl = tw[l if tw.shape[0] > 1 else 0]
            kept.append(int((wl != 0).sum()) + (m if float(tl) != 0 else 0))
        all_shapes = [s for sh in shapes for s in sh]
        wgrad = cost.gemm_seconds(all_shapes, R, T, rates)
        if me.one_pass:
            assembly = sum(cost.gemm_seconds(shapes[l], kept[l], T, rates) for l in range(L))
            total = std - wgrad + assembly + score
        else:  # two_pass: score, then a second forward/backward of the weighted rows (lower bound: one backward
            # even for layer scope, which the reference runs once per block through the shared graph)
            frac = 1.0 if w.shape[0] > 1 else max(kept) / R
            total = std + score + frac * (t_std.get("forward", 0) + t_std.get("backward", 0))
            assembly = None
        return {"floor_s": total, "scoring_est_s": score, "wgrad_skipped_s": wgrad if me.one_pass else 0.0,
                "assembly_est_s": assembly}

    def scoring_check(self, rates, repeats: int) -> dict:
        """Scoring component only, on one captured backward: auto vs each fixed exact method vs per-block best."""
        from drpost.geometry.kernels import block_stats
        from drpost.objectives import causal_lm_loss
        from drpost.step import merge_batches  # noqa: F401

        name = "layerwise/one_pass/auto"
        if name not in self.regs:
            return {}
        reg = self.regs[name]
        cap = reg.capture
        R_g, R = self.n, self.n + self.m
        with cap:
            cap.rows = R
            loss, counts = causal_lm_loss(self.model, self.merged)
        cap.backward(loss.sum())
        blocks = cap.collect()
        tc = torch.zeros(R, dtype=torch.float32, device=self.device)
        tc[R_g:] = 1.0 / counts[R_g:].sum()
        out = {}
        for need_gram in (False, True):
            methods = ["full_ghost", "direct"] + ([] if need_gram else ["reduced_ghost"])
            times = {meth: [0.0] * len(blocks) for meth in methods}
            for meth in methods:
                for l, b in enumerate(blocks):
                    if not b.factored:
                        continue
                    ts = []
                    for _ in range(repeats + 1):
                        if self.device.type == "cuda":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        block_stats(b, l, meth, tc, R_g, need_gram, False)
                        if self.device.type == "cuda":
                            torch.cuda.synchronize()
                        ts.append(time.perf_counter() - t0)
                    times[meth][l] = statistics.median(ts[1:])
            from drpost.geometry import cost

            auto = 0.0
            choices = {}
            for l, b in enumerate(blocks):
                if not b.factored:
                    continue
                c = cost.choose(b, R_g, R - R_g, self.T, need_gram, rates)
                choices[c] = choices.get(c, 0) + 1
                auto += times[c][l]
            fixed = {meth: sum(v) for meth, v in times.items()}
            best_fixed = min(fixed, key=fixed.get)
            per_block_best = sum(min(times[meth][l] for meth in methods) for l in range(len(blocks)))
            out["gram" if need_gram else "scores"] = {
                "auto_s": auto, "fixed_s": fixed, "best_fixed": best_fixed,
                "auto_over_best_fixed": auto / fixed[best_fixed], "per_block_best_s": per_block_best,
                "auto_over_per_block_best": auto / per_block_best if per_block_best > 0 else math.nan,
                "auto_choices": choices}
        cap.reset()
        self.model.zero_grad(set_to_none=True)
        return out


# --------------------------------------------------------------------------- measurement loop
def _q(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure_case(cfg: dict, methods: list[Method], repeats: int, warmup: int, rates, device, log) -> dict:
    case = Case(cfg["size"], cfg["mode"], cfg["T"], cfg["n"], cfg["m"], device, methods)
    total_p, train_p = case.n_params()
    runs = {me.name: [] for me in methods}
    peak = {}
    rng = random.Random(0)
    for _ in range(warmup):
        for me in methods:
            case.run(me)
    for _r in range(repeats):
        order = list(methods)
        rng.shuffle(order)
        for me in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            runs[me.name].append(case.run(me))
            if device.type == "cuda":
                peak[me.name] = max(peak.get(me.name, 0), torch.cuda.max_memory_allocated())
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
            "peak_mem_bytes": peak.get(me.name),
        }
        fl = case.floor(me, t_std, rates)
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
        if me.kind == "func":
            row["func_mode"] = case.func_mode
        rows[me.name] = row
        log(f"    {me.name:36s} {row['ratio']:5.2f}x [{row['ratio_q25']:.2f}-{row['ratio_q75']:.2f}]"
            + (f"  floor {row['floor_ratio']:.2f}x" if "floor_ratio" in row else ""))
    sc = case.scoring_check(rates, max(1, min(3, repeats)))
    return {"config": cfg, "params": total_p, "trainable": train_p, "standard_s": std_med,
            "standard_components_s": t_std, "methods": rows, "scoring_check": sc}


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
        t0 = time.perf_counter()
        block_stats(block, 0, method, tc, n, False, False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
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
def grid(quick: bool, micro: bool = False) -> tuple[list[dict], dict]:
    """(configurations, crossover settings). Each configuration: size, mode, T, n, m, methods ('all' | 'core')."""
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


def cfg_label(c: dict) -> str:
    return f"{c['size']} {c['mode']} T={c['T']} n={c['n']} m={c['m']}"


# --------------------------------------------------------------------------- goals and report
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
            if "over_floor" in r and (subset or meth == "full_training"):
                out.append(dict(goal="floor_gap", config=lab, method=name, value=r["over_floor"],
                                target=GOALS["floor_gap"], met=r["over_floor"] <= GOALS["floor_gap"],
                                held_back_by=r["held_back_by"]))
        for kind, sc in c.get("scoring_check", {}).items():
            out.append(dict(goal="auto_vs_best", config=lab, method=f"scoring auto ({kind})",
                            value=sc["auto_over_best_fixed"], target=GOALS["auto_vs_best"],
                            met=sc["auto_over_best_fixed"] <= GOALS["auto_vs_best"],
                            held_back_by=f"best fixed = {sc['best_fixed']}"))
        # step-level auto vs best fixed where the fixed methods ran
        ms = c["methods"]
        fixed = [f"layerwise/one_pass/{s}" for s in ("full_ghost", "reduced_ghost", "direct")]
        if "layerwise/one_pass/auto" in ms and all(f in ms for f in fixed):
            best = min(fixed, key=lambda f: ms[f]["total_s"])
            v = ms["layerwise/one_pass/auto"]["total_s"] / ms[best]["total_s"]
            out.append(dict(goal="auto_vs_best", config=lab, method="layerwise step auto", value=v,
                            target=GOALS["auto_vs_best"], met=v <= GOALS["auto_vs_best"],
                            held_back_by=f"best fixed = {best.split('/')[-1]}"))
    return out


def _ms(x):
    return "—" if x is None else f"{1e3 * x:.1f}"


def write_markdown(res: dict, path: Path, command: str) -> None:
    L = ["# System benchmark (`drpost bench system`)\n", f"Command: `{command}`\n",
         f"Machine: {res['machine']['platform']}, torch {res['machine']['torch']}, device {res['machine']['device']}, "
         f"{res['machine']['threads']} thread(s); measured GEMM rate {res['machine']['gemm_gflops']:.1f} GFLOP/s, "
         f"copy bandwidth {res['machine']['bandwidth_gbs']:.1f} GB/s. Wall time {res['wall_s']:.0f} s.\n",
         "Ratios are to a standard step (plain token-mean forward/backward + AdamW step) on the same union batch "
         "(n general + m target rows): median over interleaved repeats, [IQR] in brackets. *Floor* = measured "
         "standard step − skipped weight-gradient GEMMs + one assembly GEMM per layer over the rows that carry "
         "weight + estimated scoring FLOPs/bytes at the measured rates. *Held back by* = the component with the "
         "largest excess over the standard step's same component (scoring/solve/assembly count in full).\n"]
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
             "on one captured step, and whole layerwise step where the fixed methods ran).\n")
    for c in res["cases"]:
        cf = c["config"]
        L.append(f"## {cfg_label(cf)} — {c['params'] / 1e6:.2f}M params ({c['trainable'] / 1e6:.3f}M trainable); "
                 f"standard step {1e3 * c['standard_s']:.1f} ms\n")
        L.append("| method | ratio [IQR] | floor | meas/floor | fwd | bwd | scoring | solve | assembly | opt | "
                 "held back by | scoring choices |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, r in c["methods"].items():
            comp = r["components_s"]
            fl = f"{r['floor_ratio']:.2f}x" if "floor_ratio" in r else "—"
            of = f"{r['over_floor']:.2f}" if "over_floor" in r else "—"
            ch = ", ".join(f"{k}:{v}" for k, v in r.get("scoring_choices", {}).items())
            if r["kind"] == "func":
                ch = f"per-sample grads by {r.get('func_mode')} (in bwd)"
            L.append(f"| {name} | {r['ratio']:.2f}x [{r['ratio_q25']:.2f}–{r['ratio_q75']:.2f}] | {fl} | {of} | "
                     + " | ".join(_ms(comp[k]) for k in COMPONENTS)
                     + f" | {r['held_back_by'] or ''} | {ch} |")
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
    mains = [c for c in res["cases"] if c["config"].get("methods") == "all"] or res["cases"][:1]
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


# --------------------------------------------------------------------------- entry points
def run_system_bench(out_dir: str | Path = "results/system", quick: bool = False, *, micro: bool = False,
                     repeats: int | None = None, warmup: int = 1, threads: int | None = 1,
                     device: str | None = None, command: str | None = None, log=print) -> dict:
    """Run the system benchmark and write ``system.json``, ``metrics.json``, ``summary.md`` and PNGs.

    quick: small grid for 2 CPU cores (~10 min); micro: one tiny configuration (tests); repeats: timed repeats per
    method (default 5 quick / 7 full / 1 micro); threads: torch CPU threads (None = leave as is)."""
    from drpost.geometry import cost

    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    old_threads = torch.get_num_threads()
    if threads and dev.type == "cpu":
        torch.set_num_threads(threads)
    try:
        rates = cost.calibrate(str(dev) if dev.type == "cuda" else "cpu", repeats=7)
        cfgs, xcfg = grid(quick, micro)
        reps = repeats or (1 if micro else 5 if quick else 7)
        all_methods = method_list()
        cases = []
        for i, cf in enumerate(cfgs):
            ms = all_methods if cf["methods"] == "all" else [m for m in all_methods if m.core]
            r = reps if cf["methods"] == "all" else max(1, reps - 2 if quick else reps)
            log(f"[{i + 1}/{len(cfgs)}] {cfg_label(cf)}: {len(ms)} methods x {r} repeats")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cases.append(measure_case(cf, ms, r, warmup, rates, dev, log))
        log("crossovers")
        xo = crossovers(xcfg["shape"], xcfg["m_sweep"], xcfg["T_m"], xcfg["T_sweep"], xcfg["n"],
                        max(3, reps), rates, dev)
    finally:
        torch.set_num_threads(old_threads)
    res = {
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "device": str(dev), "threads": threads if dev.type == "cpu" else None,
                    "gemm_gflops": rates.flops_per_s / 1e9, "bandwidth_gbs": rates.bytes_per_s / 1e9},
        "settings": {"quick": quick, "micro": micro, "repeats": reps, "warmup": warmup, "lr": LR, "vocab": VOCAB,
                     "sizes": {k: list(v) for k, v in SIZES.items()}, "goals": GOALS},
        "cases": cases,
        "crossovers": xo,
    }
    res["goals"] = evaluate_goals(cases)
    res["wall_s"] = time.perf_counter() - t_start
    command = command or f"python -m drpost.bench.system{' --quick' if quick else ''} --out {out_dir}"
    (out / "system.json").write_text(json.dumps(_jsonable(res), indent=1))
    head = {g["goal"] + " | " + g["config"] + " | " + g["method"]: {"value": g["value"], "met": g["met"]}
            for g in res["goals"]}
    (out / "metrics.json").write_text(json.dumps(_jsonable({"goals": head, "wall_s": res["wall_s"]}), indent=1))
    write_markdown(res, out / "summary.md", command)
    plot(res, out)
    log(f"wrote {out}/system.json, summary.md, breakdown.png, crossovers.png in {res['wall_s']:.0f} s")
    return res


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


def run(config) -> int:
    """CLI runner (``drpost bench system``): ``config`` has ``out_dir``/``output_dir`` and optionally ``quick``,
    ``repeats``, ``device`` (an object with attributes, or a dict)."""
    get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else (
        lambda k, d=None: getattr(config, k, d))
    out_dir = get("out_dir") or get("output_dir") or "results/system"
    dev = get("device")
    dev = None if dev in (None, "auto") else dev
    reps = get("repeats")
    run_system_bench(out_dir, quick=bool(get("quick", False)), micro=bool(get("micro", False)), repeats=reps,
                     device=dev, command=f"drpost bench system output_dir={out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m drpost.bench.system", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small grid for 2 CPU cores (~10 minutes)")
    ap.add_argument("--micro", action="store_true", help="one tiny configuration (smoke test)")
    ap.add_argument("--out", default="results/system", help="output directory")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per method")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = leave as is)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    a = ap.parse_args(argv)
    cmd = "python -m drpost.bench.system " + " ".join(sys.argv[1:] if argv is None else argv)
    run_system_bench(a.out, quick=a.quick, micro=a.micro, repeats=a.repeats, threads=a.threads or None,
                     device=a.device, command=cmd.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
