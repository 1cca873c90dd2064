"""TRL adapters' step time (``drpost bench trl``): ``DrSFTTrainer``, ``DrDPOTrainer``, ``DrGRPOTrainer`` against the
plain TRL trainers they extend, single process on CPU.

The model is a random-weight Llama (no download; drpost's byte tokenizer, a larger model vocabulary so the embedding
and LM head cost what they would). For each trainer and variant (``plain`` TRL, then each drpost method) a fresh
trainer trains ``steps`` optimizer steps from the same weights; a ``TrainerCallback`` times ``on_step_begin`` ->
``on_step_end`` (data loading, forward, backward, clipping, optimizer; GRPO: generation too, the adapter's target
prompts joining TRL's generate call) on the wall clock and on this process's CPU clock. Besides ``plain`` (the TRL
trainer on the general batch alone) every trainer also runs ``plain_union``: the TRL trainer on the union batch (the
general rows plus the rows the adapter adds for the target each step: 1 SFT row or DPO pair, GRPO 1 prompt x
``GENERATIONS`` completions), the same amount of data the adapter's step sees; the ratio to it is the adapter's own
overhead, apart from the cost of the target rows themselves. The first ``warmup`` steps
are left out and the rest's median is the run's figure. Before the timed rounds each trainer runs once untimed
(plain, ``warmup`` + 1 steps: the process's first-call costs — lazy imports, allocator growth, kernel caches — would
otherwise land on the first timed run). Variants run interleaved over ``repeats`` rounds, their order rotated each
round, to spread machine noise and order effects; the table gives the median over rounds and its ratio to the plain
trainer's median. Both clocks are
always recorded; option ``clock`` picks the headline one (with one thread on a shared machine the CPU clock counts
the step's own work, wall time also the time it waited for a core).

Run (the committed figures, ``results/system/trl/``; the same command is at the top of its summary.md):
    OMP_NUM_THREADS=1 drpost bench trl steps=4 warmup=1 repeats=2 grpo_steps=5 grpo_repeats=3 clock=cpu
    drpost bench trl micro=true output_dir=/tmp/trl        # the smoke configuration, seconds
    drpost bench trl --help                                # every option

Writes ``trl.json`` (config, machine, per-round timings of every step, the table), ``summary.md`` and
``ratios.png`` under ``output_dir``; they are rewritten after each round, so a stopped run keeps its finished rounds.
"""

from __future__ import annotations

import copy
import gc
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from drpost.bench.trl_report import UNION
from drpost.config import ConfigError, leaf_options, refuse_unread, to_dict

GENERATIONS = 4  # GRPO completions per prompt (general and target)
TARGET_ROWS = 4  # target samples in the target dataset; the adapters take 1 a step
# micro=true: these values replace the size and schedule options (which are then refused)
MICRO = {"hidden": 64, "layers": 1, "vocab": 259, "seq": 16, "batch": 4, "steps": 2, "warmup": 1, "repeats": 1,
         "grpo_steps": None, "grpo_repeats": None}
READ = frozenset({"output_dir", "trainers", "methods", "hidden", "layers", "vocab", "seq", "batch", "steps", "warmup",
                  "repeats", "grpo_steps", "grpo_repeats", "precision", "threads", "clock", "micro"})
READ_MICRO = READ - set(MICRO)


# ---------------------------------------------------------------------------------------------------- settings
def settings(config) -> dict:
    """The run's effective sizes and per-trainer schedule, after ``micro``; ConfigError naming a bad option."""
    try:
        refuse_unread(config, READ_MICRO if config.micro else READ, "bench trl" + " micro=true" * config.micro)
    except ConfigError as e:
        raise ConfigError(f"{e} (micro=true sets the sizes and the schedule itself)") from None
    size = {k: (MICRO[k] if config.micro else getattr(config, k)) for k in MICRO}
    if not config.trainers:
        raise ConfigError("option 'trainers' is empty; choose from sft, dpo, grpo")
    for name in ("trainers", "methods"):
        values = getattr(config, name)
        if len(set(values)) != len(values):
            raise ConfigError(f"option '{name}' names a value twice: {values}")
    hidden = size["hidden"]
    heads = max(1, hidden // 64)
    if hidden % heads or (hidden // heads) % 2:
        raise ConfigError(f"option 'hidden' must split into {heads} head(s) (hidden // 64, at least 1) of an even "
                          f"size each, got {hidden}")
    from drpost.world.tokenizer import build_tokenizer

    if size["vocab"] < len(build_tokenizer()):
        raise ConfigError(f"option 'vocab' must be at least the byte tokenizer's {len(build_tokenizer())} tokens, "
                          f"got {size['vocab']}")
    if "grpo" in config.trainers and size["batch"] % GENERATIONS:
        raise ConfigError(f"option 'batch' must be a multiple of {GENERATIONS} with trainers=grpo (GRPO completions: "
                          f"batch/{GENERATIONS} prompts x {GENERATIONS} generations), got {size['batch']}")
    schedule = {}
    for kind in config.trainers:
        steps = size["grpo_steps"] if kind == "grpo" and size["grpo_steps"] is not None else size["steps"]
        reps = size["grpo_repeats"] if kind == "grpo" and size["grpo_repeats"] is not None else size["repeats"]
        if size["warmup"] >= steps:
            name = "grpo_steps" if kind == "grpo" and size["grpo_steps"] is not None else "steps"
            raise ConfigError(f"option 'warmup' ({size['warmup']}) must be smaller than option '{name}' ({steps})")
        schedule[kind] = {"steps": steps, "warmup": size["warmup"], "repeats": reps}
    for method in config.methods:
        for kind in config.trainers:
            dr_options(method, kind)  # ConfigError naming 'methods' for a method that cannot run on its defaults
    return {"size": {k: size[k] for k in ("hidden", "layers", "vocab", "seq", "batch")}, "heads": heads,
            "schedule": schedule, "variants": ["plain", UNION, *config.methods]}


def union_batch(kind: str, batch: int) -> int:
    """Rows per step of the plain trainer on the union batch: the general ``batch`` plus the adapter's target rows
    (one SFT row or DPO pair; GRPO: one prompt's ``GENERATIONS`` completions)."""
    return batch + (GENERATIONS if kind == "grpo" else 1)


def dr_options(method: str, kind: str) -> dict:
    """The regularizer options a method runs with: ``frac`` 0.5 (and GRPO's ``selection="filter"``) where the
    method takes them; ConfigError naming option 'methods' when the method cannot run on its defaults."""
    from drpost.feasible import make_feasible

    wanted = {"frac": 0.5, **({"selection": "filter"} if kind == "grpo" else {})}
    opts = {}
    for k, v in wanted.items():
        try:
            make_feasible(method, **{k: v})
            opts[k] = v
        except (ValueError, TypeError):
            pass
    try:
        make_feasible(method, **opts)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"option 'methods': method {method!r} cannot run with options {opts}: {e}") from None
    return opts


def command_line(config) -> str:
    """``drpost bench trl`` with every option that differs from its default (and ``OMP_NUM_THREADS`` if set)."""
    default, parts = type(config)(), []
    for name, _f, _tp in leaf_options(type(config)):
        value, base = getattr(config, name), getattr(default, name)
        if value != base:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value).lower() \
                if isinstance(value, bool) or value is None else str(value)
            parts.append(f"{name}={text}")
    return f"{_env_prefix()}drpost bench trl {' '.join(parts)}".rstrip()


def _env_prefix() -> str:
    """``OMP_NUM_THREADS=N `` when it is set (it decides the timings, so the recorded command carries it), else ''."""
    return f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""


def machine(threads: int, clock: str, precision: str) -> dict:
    """The machine record (``drpost.bench.machine``: platform, versions, threads, clock, the CPU's model and native
    bf16 instructions, GEMM rate and copy bandwidth calibrated in the run's precision) with TRL's version."""
    import trl

    from drpost.bench.machine import machine_record
    from drpost.geometry import cost

    rates = cost.calibrate("cpu", repeats=7, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    return machine_record(torch.device("cpu"), threads=threads or None, clock=clock, rates=rates, trl=trl.__version__)


# ------------------------------------------------------------------------------------------------ model, data
def build_model(tok, hidden: int, layers: int, vocab: int, seq: int):
    """Random-weight Llama (seed 0): heads of 64 dims, MLP 8/3 x hidden, untied LM head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3),
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max(2 * seq, 128), tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return LlamaForCausalLM(cfg)


def _text(i: int, n: int) -> str:
    """A deterministic string of ``n`` bytes (one byte = one token with drpost's tokenizer)."""
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    out, k = [], i
    while sum(len(w) + 1 for w in out) < n:
        out.append(words[k % len(words)])
        k = k * 7 + 3
    return " ".join(out)[:n]


def dataset(kind: str, n: int, seq: int, off: int = 0):
    """``n`` rows in TRL's format for ``kind``: prompt/completion (sft), prompt/chosen/rejected (dpo), prompt (grpo);
    each part seq/2 - 1 bytes."""
    import datasets

    half, idx = seq // 2 - 1, range(off, off + n)
    cols = {"prompt": [_text(i, half) for i in idx]}
    if kind == "sft":
        cols["completion"] = [_text(i + 1, half) for i in idx]
    elif kind == "dpo":
        cols.update(chosen=[_text(i + 1, half) for i in idx], rejected=[_text(i + 2, half) for i in idx])
    return datasets.Dataset.from_dict(cols)


def _reward(completions, **kw):
    return [float(sum(map(ord, c)) % 5) for c in completions]


class StepTimer:
    """``callback``: a TrainerCallback appending each optimizer step's wall and process-CPU seconds."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.t0 = (time.perf_counter(), time.process_time())

            def on_step_end(self, args, state, control, **kw):
                timer.wall.append(time.perf_counter() - timer.t0[0])
                timer.cpu.append(time.process_time() - timer.t0[1])

        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.callback = _CB()


def train_once(kind: str, variant: str, base, tok, size: dict, steps: int, precision: str, out_dir: str) -> dict:
    """One trainer run of ``steps`` steps from a copy of ``base``; the per-step wall and CPU seconds."""
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    from drpost.integrations.trl import DrDPOTrainer, DrGRPOTrainer, DrSFTTrainer

    seq, batch = size["seq"], size["batch"] if variant != UNION else union_batch(kind, size["batch"])
    common = dict(output_dir=out_dir, report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=1,
                  max_steps=steps, learning_rate=1e-4, disable_tqdm=True, bf16=precision == "bf16",
                  per_device_train_batch_size=batch)
    dr = {} if variant in ("plain", UNION) else dict(dr_method=variant, dr_options=dr_options(variant, kind),
                                            target_batch_size=1, target_dataset=dataset(kind, TARGET_ROWS, seq, 1000))
    kw = dict(model=copy.deepcopy(base), train_dataset=dataset(kind, batch * steps, seq), processing_class=tok)
    if kind == "sft":
        tr = (DrSFTTrainer if dr else SFTTrainer)(args=SFTConfig(max_length=seq, **common), **kw, **dr)
    elif kind == "dpo":
        tr = (DrDPOTrainer if dr else DPOTrainer)(args=DPOConfig(max_length=seq, beta=0.1, **common),
                                                  ref_model=copy.deepcopy(base), **kw, **dr)
    else:
        args = GRPOConfig(max_completion_length=seq // 2, num_generations=GENERATIONS, beta=0.0, loss_type="bnpo",
                          **common)
        tr = (DrGRPOTrainer if dr else GRPOTrainer)(args=args, reward_funcs=_reward, **kw, **dr)
    tr.remove_callback(PrinterCallback)  # no per-step log dicts on stdout
    timer = StepTimer()
    tr.add_callback(timer.callback)
    tr.train()
    del tr
    gc.collect()
    return {"wall": timer.wall, "cpu": timer.cpu}


# ------------------------------------------------------------------------------------------------------ the run
def run_trl_bench(config, command: str | None = None, log=print) -> dict:
    """Run the benchmark of ``config`` (a ``BenchTRLConfig``); writes and returns the ``trl.json`` record."""
    from drpost.bench.trl_report import table, write

    t_start = time.perf_counter()
    st = settings(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    import datasets
    import transformers

    from drpost.world.tokenizer import build_tokenizer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    old_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        tok = build_tokenizer()
        size = st["size"]
        base = build_model(tok, size["hidden"], size["layers"], size["vocab"], size["seq"])
        res = {"command": command or command_line(config), "config": to_dict(config),
               "machine": machine(config.threads, config.clock, config.precision),
               "settings": {**size, "heads": st["heads"], "params": sum(p.numel() for p in base.parameters()),
                            "precision": config.precision, "schedule": st["schedule"], "variants": st["variants"],
                            "target_batch_size": 1, "generations": GENERATIONS, "micro": config.micro},
               "runs": [], "partial": True}
        rounds = max(s["repeats"] for s in st["schedule"].values())
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for kind, sch in st["schedule"].items():  # process warm-up, untimed: the first run of each trainer
                train_once(kind, "plain", base, tok, size, sch["warmup"] + 1, config.precision, tmp)
                log(f"warm-up {kind:4s} plain ({sch['warmup'] + 1} steps, untimed)")
            variants = st["variants"]
            for r in range(rounds):
                for kind, sch in st["schedule"].items():
                    if r >= sch["repeats"]:
                        continue
                    for variant in variants[r % len(variants):] + variants[:r % len(variants)]:  # rotated order
                        t = train_once(kind, variant, base, tok, size, sch["steps"], config.precision, tmp)
                        w, c = (statistics.median(t[k][sch["warmup"]:]) for k in ("wall", "cpu"))
                        res["runs"].append({"round": r, "trainer": kind, "variant": variant, "wall_s": w, "cpu_s": c,
                                            "steps_wall_s": t["wall"], "steps_cpu_s": t["cpu"]})
                        log(f"round {r} {kind:4s} {variant:18s} wall {w:.3f} s/step, cpu {c:.3f} s/step")
                res["table"], res["wall_s"] = table(res), time.perf_counter() - t_start
                write(res, out)  # the finished rounds survive a stopped run
    finally:
        torch.set_num_threads(old_threads)
    del res["partial"]
    res["table"], res["wall_s"] = table(res), time.perf_counter() - t_start
    write(res, out)
    log(f"wrote {out}/trl.json, summary.md, ratios.png in {res['wall_s']:.0f} s")
    return res


def run(config) -> int:
    """CLI runner (``drpost bench trl``): ``config`` is a ``drpost.config.bench.BenchTRLConfig``. The command recorded
    is the one typed when this process is ``drpost bench trl ...``, else ``command_line(config)``."""
    argv = list(sys.argv)
    typed = len(argv) > 2 and Path(argv[0]).name == "drpost" and argv[1:3] == ["bench", "trl"]
    run_trl_bench(config, command=_env_prefix() + shlex.join(["drpost", *argv[1:]]) if typed else None)
    return 0
