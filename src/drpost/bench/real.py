"""The real-model SFT benchmark: the world's settings as chat turns on a pretrained instruction-tuned LLM.

``drpost bench real`` post-trains a real causal LM (default ``smollm2-135m-instruct``, set up once by
``make model``) with LoRA on world settings rendered through the model's chat template
(``drpost.world.chat_render``: the user turn in the example's own world format, the loss on the assistant turn),
and scores greedy replies with the world's verifiers (strict: the reply's first line must be the answer).

Protocol (the same for every method of a setting):
- the seed draws the data (``build_setting(setting, seed)``: the pool, the 16 target examples, validation, test
  and retention sets; ``REAL_SIZES`` trims the split sizes to what 2 CPU cores can evaluate) and the training;
- every method trains the same LoRA (r, alpha, all linear layers) for the same steps, batch (n general + m target
  rows per step), learning rate and schedule, in bf16 autocast (weights and optimizer state fp32);
- a method with knobs (``REAL_KNOBS``) runs on the first seed with each value; the best *validation* exact match
  (ties: lower validation loss) is kept for the other seeds; the test set chooses nothing;
- ``base`` is the untrained model, evaluated on each seed's data: a method that does not beat it taught nothing.

Resumable: one JSON record per finished run in ``output_dir/raw/``; running the command again skips finished runs
(a sweep longer than one sitting finishes across several), then rewrites ``summary.json``, ``README.md`` tables
and the target-vs-retention plots from every record on disk (``drpost.bench.real_report``).

    drpost bench real                                            # the committed sweep (results/real/sft)
    drpost bench real settings=sparse_related seeds=0 methods=base,full_training,layerwise_subset steps=20

``paradigm=dpo|rlvr`` runs the DPO / RLVR sweeps on the same model and data (``drpost.bench.real_rl``),
``paradigm=rlhf`` PPO on a reward model learned from the setting's preferences (``drpost.bench.real_rlhf``); the
pieces they share (settings and sizes, chat rendering, strict scoring) live in ``drpost.bench.real_common``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from drpost.bench.quality import METHODS, offline_selection
from drpost.bench.quality_methods import prefilter_of
from drpost.bench.real_common import (
    MODEL_DEFAULT,
    REAL_RECIPE,
    REAL_SIZES,
    RealSizes,
    chat_exact_match,
    chat_examples,
    claim_output,
    device_name,
    device_of,
    output_dir_of,
    real_settings,
    sized,
    token_mean_loss,
)
from drpost.bench.records import best_knobs, load_records, missing, record_name, tuned_sweep, write_record
from drpost.trainers.sft import SFTRecipe, encode_examples, train_sft

# knob values searched on the first seed's validation split (the mechanism of ``drpost bench quality``): the world
# benchmark's grids (``bench.quality_methods.METHODS``: two values each), one extra ~5 CPU-minute run per method
# with a knob and setting on the first seed. ``REAL_FIXED`` holds the values the world benchmark chose on its own
# validation splits: the real-model demo's knobs, and a method's knob where it has no grid here.
REAL_KNOBS: dict[str, list] = {m: list(values) for m, (_label, _build, values) in METHODS.items() if values}
REAL_FIXED: dict[str, object] = {"dsir": 0.02, "layerwise_subset": 0.25, "global_subset": 0.5, "mixing": 0.2,
                                 "less": 0.1, "capped_simplex": 4,
                                 # composed (offline prefilter, then the Dr step within it): keep 10% of the pool
                                 "dsir_prefilter_layerwise_subset": 0.1, "dsir_prefilter_hull": 0.1,
                                 "less_prefilter_hull": 0.1,  # LESS>Hull: DSIR>Hull's value (not in the world run)
                                 "dsir_prefilter_ball_auto": 0.1, "less_prefilter_ball_auto": 0.1}  # likewise
REAL_METHODS = ["base", "full_training", "target_only", "mixing", "dsir", "less", "greats", "global_subset",
                "layerwise_subset", "hull", "dsir_prefilter_hull", "less_prefilter_hull"]


def evaluate(model, tokenizer, data, rows: dict, sizes: RealSizes) -> dict:
    """Target test/validation exact match, validation loss, and retention (mean over the held-out pool families)."""
    k = sizes.max_new_tokens
    out = {"target_em": chat_exact_match(model, tokenizer, data.target_test, k),
           "val_em": chat_exact_match(model, tokenizer, data.target_val, k),
           "val_loss": token_mean_loss(model, tokenizer, rows["val"])}
    ret = {f: chat_exact_match(model, tokenizer, ex, k) for f, ex in data.retention.items()
           if f != data.setting.target_family}
    out["retention_em"] = sum(ret.values()) / max(1, len(ret))
    out["retention_by_family"] = ret
    return out


# ----------------------------------------------------------------------------------------------------- one run
class Worker:
    """Holds the base model and each (setting, seed)'s data for the runs of one process."""

    def __init__(self, model_name: str, sizes: RealSizes, recipe: SFTRecipe, device: str = "cpu"):
        from drpost.models import load_pretrained

        self.model_name, self.sizes, self.recipe, self.device = model_name, sizes, recipe, device
        self.base, self.tok = load_pretrained(model_name)
        self.base.to(device)
        if self.tok.pad_token_id is None:
            from drpost.data.chat import ensure_pad_token

            ensure_pad_token(self.tok)
        self._data: dict = {}

    def data(self, setting: str, seed: int) -> dict:
        from drpost.world.settings import build_setting

        key = (setting, seed)
        if key not in self._data:
            built = build_setting(sized(real_settings()[setting], self.sizes), seed)
            max_len = self.recipe.max_length
            self._data[key] = {
                "data": built, "cache": {},
                "general": chat_examples(self.tok, built.general),
                "target": chat_examples(self.tok, built.target_train),
                "rows": {"val": encode_examples(self.tok, chat_examples(self.tok, built.target_val), max_len)}}
            d = self._data[key]
            d["g_rows"] = encode_examples(self.tok, d["general"], max_len)
            d["t_rows"] = encode_examples(self.tok, d["target"], max_len)
        return self._data[key]

    def run(self, setting: str, method: str, knob, seed: int, less_dir: Path | None = None) -> dict:
        """Train (unless ``base``) and evaluate one (setting, method, knob, seed); returns the record. ``less_dir``:
        where LESS keeps each scored warm-up checkpoint (its scoring, ~1.7 CPU-hours per pool, then resumes)."""
        d = self.data(setting, seed)
        data = d["data"]
        t0 = time.perf_counter()
        recipe = replace(self.recipe, seed=seed)
        steps_s = None
        weight = {}
        if method == "base":
            model, label = self.base, "base (untrained)"
        else:
            label, build, _ = METHODS[method]
            selected = offline_selection(method, knob, self.base, self.tok, data, d["g_rows"], d["t_rows"], seed,
                                         d["cache"], less_dir)
            t1 = time.perf_counter()
            metrics = train_sft(copy.deepcopy(self.base), self.tok, d["general"], d["target"], build(knob), recipe,
                                selected=selected, general_rows=d["g_rows"])
            steps_s = (time.perf_counter() - t1) / recipe.steps
            model, weight = metrics.pop("model"), metrics["family_weight"]
        ev = evaluate(model, self.tok, data, d["rows"], self.sizes)
        return {"setting": setting, "method": method, "label": label, "knob": knob, "seed": seed,
                "model": self.model_name, "paradigm": "sft", **ev,
                "family_weight": weight, "target_family": data.setting.target_family,
                "seconds_per_step": steps_s, "wall_seconds": time.perf_counter() - t0,
                "selection_seconds": d["cache"].get(("less_seconds", seed)) if prefilter_of(method) == "less" else None,
                "device": device_name(self.device),
                "budget": asdict(recipe) if method != "base" else None, "sizes": asdict(self.sizes)}


_WORKER: Worker | None = None


def _init_worker(model_name, sizes, recipe, device, threads):
    """This process's worker; one already built for the same model, sizes, recipe and device is kept (in-process
    sweeps call this once per phase: the model and each seed's data load once)."""
    global _WORKER
    torch.set_num_threads(threads)
    w = _WORKER
    if w is None or (w.model_name, w.sizes, w.recipe, w.device) != (model_name, sizes, recipe, device):
        _WORKER = Worker(model_name, sizes, recipe, device)


def _task(args):
    """Run one task (``tasks``: a single job, or the jobs that share one pool's LESS scores), writing each record as
    it finishes."""
    jobs, out_dir = args
    for job in jobs:
        rec = _WORKER.run(*job, less_dir=Path(out_dir) / "less")
        write_record(out_dir, rec)
        print(f"[bench real] {rec['setting']} {rec['label']} knob={rec['knob']} seed={rec['seed']}: target EM "
              f"{rec['target_em']:.3f}, val EM {rec['val_em']:.3f}, retention {rec['retention_em']:.3f} "
              f"({rec['wall_seconds']:.0f}s)", flush=True)


def tasks(jobs: list[tuple]) -> list[list[tuple]]:
    """The jobs grouped so that one process scores each (setting, seed)'s pool with LESS once: the LESS-selected
    jobs of a (setting, seed) form one task, every other job a task of its own."""
    groups: dict[tuple, list[tuple]] = {}
    for j in jobs:
        setting, method, _knob, seed = j
        groups.setdefault(("less", setting, seed) if prefilter_of(method) == "less" else j, []).append(j)
    return list(groups.values())


def run_jobs(jobs: list[tuple], out_dir: Path, model_name: str, sizes: RealSizes, recipe: SFTRecipe,
             workers: int, device: str = "cpu") -> None:
    """Run the jobs whose record is missing; ``workers`` processes with one torch thread each (or this process)."""
    todo = missing(jobs, out_dir)
    if not todo:
        return
    if workers <= 1:
        _init_worker(model_name, sizes, recipe, device, torch.get_num_threads())
        for t in tasks(todo):
            _task((t, out_dir))
        return
    import multiprocessing as mp

    todo_tasks = tasks(todo)
    with mp.get_context("spawn").Pool(min(workers, len(todo_tasks)), _init_worker,
                                      (model_name, sizes, recipe, device, 1)) as pool:
        for _ in pool.imap_unordered(_task, [(t, out_dir) for t in todo_tasks]):
            pass


def knob_values(method: str) -> list:
    return REAL_KNOBS.get(method) or [REAL_FIXED.get(method)]


def sweep(settings: list[str], methods: list[str], seeds: list[int], out_dir: str | Path,
          model_name: str = MODEL_DEFAULT, sizes: RealSizes = REAL_SIZES, recipe: SFTRecipe = REAL_RECIPE,
          workers: int = 2, device: str = "cpu") -> list[dict]:
    """Tuning runs (first seed, every knob value), then the other seeds with the chosen knobs
    (``drpost.bench.records.tuned_sweep``); returns every record on disk for these settings/methods/seeds."""
    out = Path(out_dir)
    return tuned_sweep(settings, methods, seeds, out, knob_values,
                       lambda jobs: run_jobs(jobs, out, model_name, sizes, recipe, workers, device))


# --------------------------------------------------------------------------------------------------------- CLI
def recipe_of(config) -> SFTRecipe:
    """The shared training recipe of a ``BenchRealConfig`` (LoRA on every linear layer); ``none`` options keep
    ``REAL_RECIPE``'s value."""
    def given(value, default):
        return default if value is None else value

    r = REAL_RECIPE
    return replace(r, steps=given(config.steps, r.steps),
                   general_batch_size=given(config.general_batch_size, r.general_batch_size),
                   target_batch_size=config.target_batch_size, max_length=config.max_length, lr=given(config.lr, r.lr),
                   warmup_ratio=config.warmup_ratio, max_grad_norm=config.max_grad_norm, lora_r=config.lora_r,
                   lora_alpha=config.lora_alpha, bf16=config.bf16)


# the options the SFT sweep reads (the others belong to paradigm=dpo|rlvr and are refused here)
READ = frozenset({"paradigm", "output_dir", "model", "settings", "methods", "seeds", "steps", "general_batch_size",
                  "target_batch_size", "max_length", "lr", "warmup_ratio", "max_grad_norm", "lora_r", "lora_alpha",
                  "bf16", "workers", "device", "rewrite"})


def run(config) -> list[dict] | dict:
    """``drpost bench real``: the sweep (resumable), then the tables and plots from every record on disk;
    ``paradigm=dpo|rlvr`` runs ``drpost.bench.real_rl``, ``paradigm=rlhf`` ``drpost.bench.real_rlhf``."""
    from drpost.bench.quiet import quiet_libraries
    from drpost.bench.real_report import write_report
    from drpost.config import ConfigError, refuse_unread

    if config.paradigm == "rlhf":
        from drpost.bench import real_rlhf

        return real_rlhf.run(config)
    if config.paradigm != "sft":
        from drpost.bench import real_rl

        return real_rl.run(config)
    refuse_unread(config, READ, "bench real paradigm=sft")
    known = real_settings()
    for s in config.settings:
        if s not in known:
            raise ConfigError(f"option 'settings': {s!r} is not a real-model setting; choose from {', '.join(known)}")
    for m in config.methods:
        if m != "base" and m not in METHODS:
            raise ConfigError(f"option 'methods': {m!r} is not a method; choose from base, {', '.join(METHODS)}")
    out = output_dir_of(config)
    made_by = claim_output(config, out, "drpost bench real", resolve=lambda c: {
        k: getattr(recipe_of(c), k) for k in ("steps", "general_batch_size", "lr")})
    if not config.rewrite:
        from drpost.models import resolve_model

        resolve_model(config.model)  # a missing model fails here, saying what to run
        device = device_of(config)
        with quiet_libraries(False):
            sweep(list(config.settings), list(config.methods), [int(s) for s in config.seeds], out,
                  config.model, REAL_SIZES, recipe_of(config), config.workers, device)
    records = load_records(out)
    if not records:
        raise ConfigError(f"option 'output_dir': no records in {out / 'raw'}")
    return write_report(records, out, made_by)


__all__ = ["MODEL_DEFAULT", "REAL_FIXED", "REAL_KNOBS", "REAL_METHODS", "REAL_RECIPE", "REAL_SIZES", "RealSizes",
           "READ", "Worker", "best_knobs", "chat_examples", "chat_exact_match", "evaluate", "load_records",
           "real_settings", "record_name", "run", "sweep"]
