"""Pretraining the world's base model on the broad corpus, and its disk cache.

Owns: the pretraining recipes (``RECIPES``), ``pretrain(size)`` (the training loop), ``cache_dir()``,
``base_model_path(size)`` and ``ensure_base_model(size)`` (build once, then reuse).

Broad corpus: every task family, in the pretraining formats only (``tasks.PRETRAIN_FORMATS``: templates ``qa`` and
``inst`` with instruction phrase set "a"), clean labels, lengths/ranges spanning the pool difficulties. The target
formats (``arrow``, ``bracket``, phrase set "b") are never seen in pretraining. Loss: completion tokens only (the
answer and EOS), token mean over the batch; examples are generated on the fly and length-bucketed. Schedule: the
shared ``drpost.trainers.loop.warmup_decay`` (warm-up times a linear decay, floor 0.05).

Cache: ``$DRPOST_CACHE`` (else ``~/.cache/drpost``) / ``base-<size>-<hash>``, the hash covering the model config and
the recipe; written to a temporary directory then renamed (atomic), saved with ``save_pretrained`` (safetensors)
plus ``pretrain.json`` (recipe, parameters, wall time, loss curve).

Run: ``python -m drpost.world.pretrain --size tiny`` (``--force`` rebuilds, ``--threads N``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from drpost.data.collate import collate, tokenize_prompt_completion
from drpost.objectives.sft import causal_lm_loss
from drpost.trainers.loop import warmup_decay
from drpost.world.arch import build_model, model_config, n_params
from drpost.world.tasks import FAMILY_NAMES, PRETRAIN_FORMATS, Difficulty, generate_examples
from drpost.world.tokenizer import build_tokenizer

CORPUS_VERSION = 1  # bump when the task generators or formats change in a way that should invalidate caches
PRETRAIN_DIFFICULTY = Difficulty(min_len=2, max_len=7, max_num=99, max_item=9)

# Not hashed. One thread: at these sizes a second thread gains little, and on a shared 2-core machine OpenMP
# spinning made 2 threads 20-35x slower per step (measured: tiny 111 ms/step on 1 thread vs 4 s on 2 under load).
DEFAULT_THREADS = {"micro": 1, "tiny": 1}
RECIPES: dict[str, dict] = {
    "micro": dict(steps=120, batch_size=16, lr=3e-3, warmup=10, weight_decay=0.0, seed=0),
    "tiny": dict(steps=3600, batch_size=32, lr=3e-3, warmup=100, weight_decay=0.01, seed=0),
}


# Pretrained base models shipped with the package (made by `python -m drpost.world.pretrain --size tiny` and copied
# here): the demo's embedded default, so a fresh machine need not pretrain first. Keyed like the cache, so any change
# to the recipe, corpus or model config ignores them and pretrains afresh.
BUNDLE_DIR = Path(__file__).parent / "assets"


def cache_dir() -> Path:
    return Path(os.environ.get("DRPOST_CACHE") or Path.home() / ".cache" / "drpost")


def corpus_fingerprint() -> str:
    """Hash of a fixed sample of the corpus (every family x format): changes when generators, phrases or templates do."""
    sample = [generate_examples(2, [f], [fmt], PRETRAIN_DIFFICULTY, seed=f"fp-{f}-{fmt}")
              for f in FAMILY_NAMES for fmt in PRETRAIN_FORMATS]
    return hashlib.sha256(json.dumps(sample, sort_keys=True).encode()).hexdigest()[:16]


def _model_dict(size: str) -> dict:
    """The model config as a dict, without the library version that wrote it (it does not change the weights)."""
    d = model_config(size).to_dict()
    d.pop("transformers_version", None)
    return d


def recipe(size: str) -> dict:
    """Everything that determines the pretrained weights (hashed into the cache key)."""
    return {**RECIPES[size], "size": size, "families": list(FAMILY_NAMES), "formats": list(PRETRAIN_FORMATS),
            "difficulty": dataclasses.asdict(PRETRAIN_DIFFICULTY), "corpus_version": CORPUS_VERSION,
            "corpus_fingerprint": corpus_fingerprint(), "model": _model_dict(size)}


def base_model_path(size: str = "tiny") -> Path:
    key = hashlib.sha256(json.dumps(recipe(size), sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache_dir() / f"base-{size}-{key}"


def _batches(rng: random.Random, tokenizer, batch_size: int, chunk: int = 16):
    """Endless length-bucketed batches of tokenized rows: generate chunk*batch examples, sort by length, split."""
    while True:
        ex = generate_examples(batch_size * chunk, FAMILY_NAMES, PRETRAIN_FORMATS, PRETRAIN_DIFFICULTY,
                               seed=rng.getrandbits(64))
        rows = sorted((tokenize_prompt_completion(tokenizer, e["prompt"], e["completion"]) for e in ex),
                      key=lambda r: len(r["input_ids"]))
        groups = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        rng.shuffle(groups)
        yield from groups


def pretrain(size: str = "tiny", threads: int | None = None, log_every: int = 250, verbose: bool = True):
    """Train a fresh model of ``size`` with its recipe; returns ``(model, tokenizer, info dict)``."""
    rc = RECIPES[size]
    prev_threads = torch.get_num_threads()
    threads = threads or int(os.environ.get("DRPOST_THREADS", 0)) or DEFAULT_THREADS.get(size, 2)
    torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
    try:
        tokenizer = build_tokenizer()
        model = build_model(size, seed=rc["seed"])
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=rc["lr"], betas=(0.9, 0.95), weight_decay=rc["weight_decay"])
        steps, warm = rc["steps"], rc["warmup"]
        sched = warmup_decay(opt, steps, warm, floor=0.05)  # warm-up times a linear decay to 5%
        data = _batches(random.Random(f"pretrain-{rc['seed']}"), tokenizer, rc["batch_size"])
        curve, t0, run = [], time.time(), 0.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rc["seed"])
            for step in range(1, steps + 1):
                batch = collate(next(data), pad_id=tokenizer.pad_token_id)  # (B, T) tensors
                sums, counts = causal_lm_loss(model, batch)  # (B,), (B,)
                loss = sums.sum() / counts.sum()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                lv = loss.item()
                run = lv if step == 1 else 0.98 * run + 0.02 * lv
                if step % log_every == 0 or step == steps:
                    curve.append((step, round(run, 4), round(time.time() - t0, 1)))
                    if verbose:
                        print(f"[pretrain {size}] step {step}/{steps} loss {run:.4f} {time.time() - t0:.0f}s",
                              flush=True)
        info = {"size": size, "params": n_params(model), "wall_s": round(time.time() - t0, 1),
                "threads": torch.get_num_threads(), "final_loss": round(run, 4), "curve": curve, "recipe": recipe(size)}
    finally:
        torch.set_num_threads(prev_threads)
    model.eval()
    return model, tokenizer, info


def ensure_base_model(size: str = "tiny", force: bool = False, threads: int | None = None) -> Path:
    """Path of the cached base model of ``size``, pretraining and saving it first if absent (or ``force``)."""
    path = base_model_path(size)
    if path.is_dir() and (path / "pretrain.json").exists() and not force:
        return path
    bundled = BUNDLE_DIR / path.name  # shipped with the package, same cache key = same recipe and corpus
    if bundled.is_dir() and (bundled / "pretrain.json").exists() and not force:
        return bundled
    model, tokenizer, info = pretrain(size, threads=threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps(info, indent=1, default=str))
        if force and path.exists():
            shutil.rmtree(path)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first: keep theirs
            if not (path / "pretrain.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Pretrain (or find cached) the world's base model.")
    ap.add_argument("--size", default="tiny", choices=sorted(RECIPES))
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: $DRPOST_THREADS, else 1)")
    args = ap.parse_args(argv)
    path = ensure_base_model(args.size, force=args.force, threads=args.threads)
    info = json.loads((path / "pretrain.json").read_text())
    print(f"base model {args.size}: {path} params={info['params']} wall={info['wall_s']}s loss={info['final_loss']}")


if __name__ == "__main__":
    main()
