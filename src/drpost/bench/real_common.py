"""What the real-model benchmarks share (``drpost bench real``, every paradigm): the settings and their split sizes,
world examples as chat turns, strict greedy scoring, the token-mean loss of rows, and the command echoed in reports.

The SFT sweep (``drpost.bench.real``) and the DPO / RLVR sweeps (``drpost.bench.real_rl``) both draw their data with
``build_setting(sized(real_settings()[name]), seed)`` and score replies with ``chat_exact_match`` (the family's
verifier on the reply's first line, ``drpost.world.chat_render.verify_chat``), so their numbers are comparable for
the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from drpost.bench.machine import device_name  # noqa: F401  (re-exported: the real-model records name their device)
from drpost.trainers.sft import SFTRecipe

MODEL_DEFAULT = "smollm2-135m-instruct"
# every chat turn starts with an empty system turn: the template's default system sentence would add 16 tokens to
# each of the rows trained and evaluated (about 40% of a row here), for nothing the tasks need
SYSTEM = ""


@dataclass(frozen=True)
class RealSizes:
    """Split sizes of a real-model setting (the world's defaults are sized for a 0.87M model)."""

    n_pool: int = 4000
    n_val: int = 48
    n_test: int = 200
    n_retention: int = 8  # per held-out pool family (12-15 families: ~100-120 prompts)
    max_new_tokens: int = 8  # the answers are a few tokens; a sentence fails on its first line anyway


REAL_SIZES = RealSizes()


# fp32: these CPUs (AMD EPYC, AVX2, no AVX512-BF16) emulate bf16; under bf16 autocast a LoRA step took 97-105 s
# against 5.5-6.0 s in fp32 (1 thread, 9 rows). Where the CPU has AVX512-BF16/AMX or on a GPU, bf16=true pays.
REAL_RECIPE = SFTRecipe(steps=40, general_batch_size=8, target_batch_size=1, lr=1e-3, warmup_ratio=0.03,
                        max_grad_norm=1.0, max_length=128, finetuning="lora", lora_r=8, lora_alpha=16, bf16=False)


def real_settings() -> dict:
    """The settings of the real-model benchmark: world settings whose target answers are a few tokens long.

    - ``sparse_related`` (LESS mix -> TyDiQA-like): the world's own; target sum_list in the bracket format, 6% of
      the pool is the target skill (in the target format), 8% related list skills, the rest unrelated, 10% noise.
    - ``format_shift`` (Alpaca -> SAMSum-like): every family in the pool; the target max_list in the arrow format,
      which the pool carries only in the qa/inst formats; 5% noise.
    """
    from drpost.world.settings import SETTINGS, Setting, _uniform
    from drpost.world.tasks import FAMILY_NAMES, Difficulty

    fmt_shift = Setting(
        name="format_shift", pool_families=_uniform(FAMILY_NAMES), target_family="max_list", target_format="arrow",
        pool_formats=(("qa", 0.4), ("inst", 0.4), ("arrow", 0.2)),
        family_pool_formats=(("max_list", (("qa", 0.5), ("inst", 0.5))),), noise=0.05,
        pool_difficulty=Difficulty(min_len=3, max_len=7), target_difficulty=Difficulty(min_len=3, max_len=7),
        description="alpaca->samsum-like: the target skill is in the pool, only in other formats")
    return {s.name: s for s in (SETTINGS["sparse_related"], fmt_shift)}


def sized(setting, sizes: RealSizes = REAL_SIZES):
    return replace(setting, n_pool=sizes.n_pool, n_val=sizes.n_val, n_test=sizes.n_test,
                   n_retention=sizes.n_retention)


def chat_examples(tokenizer, examples: list[dict]) -> list[dict]:
    """World examples as chat-template prompt/completion pairs (loss on the assistant turn), metadata kept."""
    from drpost.world.chat_render import chat_prompt_completion

    out = []
    for e in examples:
        prompt, completion, add_eos = chat_prompt_completion(tokenizer, e, system=SYSTEM)
        out.append({**e, "prompt": prompt, "completion": completion, "add_eos": add_eos})
    return out


def chat_exact_match(model, tokenizer, examples: list[dict], max_new_tokens: int) -> float:
    """Share of greedy replies whose first line is the answer (``chat_render.verify_chat``); ``examples`` are world
    examples (their own prompts, not chat-rendered ones)."""
    from drpost.world.chat_render import generate_replies, verify_chat

    if not examples:
        return float("nan")
    model.eval()
    replies = generate_replies(model, tokenizer, examples, batch_size=64, max_new_tokens=max_new_tokens,
                               system=SYSTEM)
    return sum(verify_chat(e["family"], r, e["answer"]) for e, r in zip(examples, replies)) / len(examples)


@torch.no_grad()
def token_mean_loss(model, tokenizer, rows: list[dict], batch_size: int = 32) -> float:
    """Token-mean loss of ``rows`` (encoded prompt/completion rows) under ``model``."""
    from drpost.data.collate import collate
    from drpost.objectives.sft import causal_lm_loss

    model.eval()
    dev = next(model.parameters()).device
    total = count = 0.0
    for s in range(0, len(rows), batch_size):
        batch = {k: v.to(dev) for k, v in collate(rows[s:s + batch_size], tokenizer.pad_token_id).items()}
        sums, counts = causal_lm_loss(model, batch)
        total, count = total + float(sums.sum()), count + float(counts.sum())
    return total / max(count, 1.0)


def device_of(config) -> str:
    """The ``device`` option resolved (auto -> cuda where available, else cpu); a CUDA device without CUDA is refused
    naming the option (ConfigError)."""
    from drpost.trainers.setup import resolve_device

    return str(resolve_device(config.device))


def with_lr(knob, lr: float, budget_lr: float):
    """A run's knob with its learning rate: the method's knob alone at the budget's lr (so the records of a sweep
    that tunes nothing keep their names), else ``'<knob>,lr=<lr>'`` (``'lr=<lr>'`` for a method without a knob)."""
    if lr == budget_lr:
        return knob
    return f"lr={lr:g}" if knob is None else f"{knob},lr={lr:g}"


def split_lr(knob) -> tuple:
    """(the method's own knob, the learning rate) of a run's knob made by ``with_lr``; the lr is None where the knob
    names none (the budget's)."""
    if not (isinstance(knob, str) and "lr=" in knob):
        return knob, None
    head, _, lr = knob.rpartition("lr=")
    return head.rstrip(",") or None, float(lr)


def output_dir_of(config) -> Path:
    """A ``BenchRealConfig``'s output directory: ``output_dir``, or ``results/real/<paradigm>`` when it is empty."""
    return config.output_path()


# options that say how to run, not what runs: they may change between the sittings of one sweep
FREE = frozenset({"output_dir", "workers", "device", "rewrite"})


def claim_output(config, out: Path, default: str, resolve=None, **resolved) -> str:
    """Write ``out/config.yaml`` before the sweep and return the command the tables name.

    ``drpost.bench.records.claim_dir``: a directory that holds records keeps the recipe they were made with (another
    value is refused by name; ``resolve`` maps ``none`` options to the values they take) and its run lists grow, so
    the file always describes every run on disk. ``resolved`` are run lists a paradigm resolved from its defaults.
    The command is this invocation where its lists hold every run of the directory, else ``drpost bench real
    --config out/config.yaml``; ``rewrite=true`` leaves an existing config.yaml as it is."""
    from drpost.bench.records import claim_dir

    config = replace(config, **resolved)
    path = out / "config.yaml"
    if not (config.rewrite and path.exists()):
        _, covered = claim_dir(config, out, FREE, resolve)
        if covered and not config.rewrite:
            return command(default)
    return f"drpost bench real --config {path}"


def command(default: str) -> str:
    """The command line that made the records (``rewrite=...`` left out), or ``default`` outside the CLI."""
    import sys

    if sys.argv and sys.argv[0].endswith("drpost"):
        return "drpost " + " ".join(a for a in sys.argv[1:] if not a.lstrip("-").startswith("rewrite"))
    return default


__all__ = ["FREE", "MODEL_DEFAULT", "REAL_SIZES", "SYSTEM", "RealSizes", "chat_examples", "chat_exact_match", "claim_output", "command",
           "output_dir_of", "real_settings", "sized", "split_lr", "token_mean_loss", "with_lr"]
