"""The real-model DPO and RLVR benchmarks: ``drpost bench real paradigm=dpo|rlvr``.

The same model (default ``smollm2-135m-instruct``), LoRA (r 8, alpha 16, every linear layer) and data as the SFT
sweep (``drpost.bench.real``): the seed draws the pool, the 16 target examples, validation, test and retention sets
(``build_setting(sized(real_settings()[setting]), seed)``), every example a chat turn with an empty system turn
(``drpost.bench.real_common``). Default setting: ``format_shift`` (target max_list in the arrow format; the base
model partly knows max_list but answers in sentences, so it scores 0 under strict scoring).

DPO (``drpost.trainers.dpo.train_dpo``). A pair is (prompt, chosen, rejected): prompt = the chat-rendered user turn
plus the assistant header, exactly what precedes the answer in the SFT row; chosen = the SFT row's answer ending in
end-of-turn (the example's completion, so the pool's 5% noisy labels are noisy pairs: ``flipped``); rejected = the
*base model's own greedy reply* (``REJECT_MAX_NEW`` tokens, a sentence almost always), replaced by a corrupted wrong
answer (``world.tasks.corrupt_answer``) when the verifier accepts it. The replies are generated once per (setting,
seed) and cached in ``output_dir/cache/`` (json), shared by every method and by re-runs. General pairs: a seeded
subsample of ``N_PAIRS`` = 256 pool examples (bounds the generation to ~1.2 CPU-minutes per seed; a 12-step run
draws 96 general pairs); target pairs: the 16 targets.

RLVR (``drpost.trainers.rlvr.train_rlvr``, GRPO). General prompts: the whole pool (each scored by its own family's
verifier); target prompts: the 16 targets. Reward (``shaped_reward``): 1.0 when the reply's first line is the answer
(strict, the scoring of target EM), ``PARTIAL`` = 0.25 when the true answer is a whole token of the first line but
the line is more than the answer (``chat_render.answer_in_line``), else 0. The partial credit is shaping: the base
model scores 0 strictly everywhere, so strict rewards alone would give GRPO groups of zero variance (no update).
Even so, the base model's *sampled* replies to 16 pool prompts (4 each, temperature 1 or 0.7) all scored 0, against
0.03 mean reward (31-38% of groups with variance) on the targets: from the base model most general groups carry no
gradient. So RLVR starts, as usual, from an SFT model (``warm_start=auto`` = ``sft`` for RLVR): FullTraining SFT on
the seed's pool with the SFT sweep's recipe (LoRA r8, 40 steps, ``REAL_RECIPE``), merged into the weights, trained
once per (setting, seed) and cached in ``output_dir/cache/warm__<setting>__s<seed>/``. Every method starts there, it
is the reference of the KL, and it is a row of the tables (``warm_start``) beside the untrained ``base``. DPO starts
from the base model (its replies are the rejected side); ``warm_start=sft`` moves it too.

Methods (both paradigms): ``base`` (the untrained model), FullTraining, Target-only, GlobalSubset, LayerWiseSubset,
Hull, with the toy RL benchmark's fixed knobs (``drpost.bench.rl.METHODS``: DPO subsets keep the top half of the
batch; RLVR subsets drop negative scores, ``filter``, ``frac=1``) and budgets (``BUDGETS``) fixed in advance. The
learning rate is tuned per method (``lrs``; default ``LR_GRID``: DPO and RLVR 5e-4, 2e-4, 1e-3):
each value runs on the first seed, the best validation EM (ties: lower validation loss) runs the other seeds, and a
run at another lr than the budget's carries it in its knob (``with_lr``: ``'0.5,lr=0.0002'``). Evaluation, on the
first ``N_TEST`` = 100 test targets: greedy strict exact match (``target_em``), the KL to the base model (k3 on
sampled replies, ``trainers.rl_common.evaluate_policy``), for RLVR the mean shaped reward of sampled replies
(``target_reward``); validation EM and loss and retention (8
prompts per held-out pool family) exactly as the SFT sweep.

Resumable: one JSON record per finished run in ``output_dir/raw/`` (``drpost.bench.records``); re-running skips
finished runs, then rewrites ``summary.json``, ``tables.md`` and the target-vs-KL plots (``bench.real_rl_report``).
``paradigm=rlhf`` (``drpost.bench.real_rlhf``, which imports this module and never the reverse) subclasses
``RLWorker`` (its ``train``, ``reward_of`` and ``reward_metrics`` hooks) and runs through ``run_jobs``.

    drpost bench real paradigm=dpo                         # results/real/dpo
    drpost bench real paradigm=rlvr seeds=0 methods=base,full_training,hull steps=10
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

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
    split_lr,
    token_mean_loss,
    with_lr,
)
from drpost.bench.real_rl_data import (
    N_PAIRS,
    PARTIAL,
    REJECT_MAX_NEW,
    base_replies,
    chosen_text,
    dpo_pair,
    pair_pool,
    reward_fn,
    shaped_reward,
    strict_check,
)
from drpost.bench.records import load_records, missing, tuned_sweep, write_record
from drpost.bench.rl import METHODS as SPECS
from drpost.trainers.dpo import DPORecipe
from drpost.trainers.rlvr import RLVRRecipe
from drpost.trainers.sft import SFTRecipe

PARADIGMS = ("dpo", "rlvr")
RL_METHODS = ["base", "full_training", "target_only", "global_subset", "layerwise_subset", "hull"]
UNTRAINED = ("base", "warm_start")  # rows evaluated without training: the base model, the SFT warm start
# where each paradigm starts (``warm_start=auto``): RLVR from the SFT warm start (the usual SFT-then-RL pipeline: the
# base model earns no reward on the pool, so GRPO would get no signal from it), DPO from the base model (its own
# replies are the rejected side)
WARM_DEFAULT = {"dpo": "none", "rlvr": "sft"}
RL_SETTINGS = ["format_shift"]
N_TEST = 100  # test target prompts evaluated (of REAL_SIZES.n_test)
ROLLOUT_TOKENS = 10  # new tokens of RLVR rollouts and of the target evaluation (greedy and sampled), both paradigms
# Fixed budgets, sized so that one run costs about 5 CPU-minutes with its evaluation. Pilot (smollm2-135m-instruct,
# format_shift, 1 thread, fp32, 3 steps, machine shared): a DPO step (8 + 1 pairs) ~15 CPU-s (19.6 s wall), an
# RLVR step (4 + 1 prompts x 4 replies) ~22 CPU-s (40 s wall), the evaluation ~115 CPU-s (168 s wall), the rejected
# replies ~0.27 CPU-s per prompt (once per setting and seed). Hence DPO 12 steps (~5 CPU-min a run), RLVR 8 steps
# (~5); RLVR's lr is the top of the LoRA range 1e-4..5e-4 because the run is short.
BUDGETS = {
    "dpo": DPORecipe(steps=12, general_batch_size=8, target_batch_size=1, lr=5e-4, beta=0.1, warmup_ratio=0.03,
                     max_grad_norm=1.0, max_length=128),
    "rlvr": RLVRRecipe(steps=8, prompts_per_step=4, target_prompts=1, group_size=4, lr=5e-4, max_grad_norm=1.0,
                       max_new_tokens=ROLLOUT_TOKENS),
}
LORA = SFTRecipe(finetuning="lora", lora_r=8, lora_alpha=16)
# learning rates each trained method runs with on the first seed, the best on validation kept for the others
# (``lrs=none``). DPO: the budget's 5e-4 (12 steps moved every method 7-10 nats per reply from the base model) and a
# value on each side of it (each costs ~5 CPU-minutes x 5 methods on the first seed). RLVR: the same grid around its
# budget's 5e-4 (a run costs 4-6 CPU-minutes; the tuning adds 10 runs on the first seed). RLHF (``real_rlhf``): the
# same grid around its budget's 5e-4 (a run costs ~5 CPU-minutes; the tuning adds 12 runs on the first seed).
LR_GRID = {"dpo": (5e-4, 2e-4, 1e-3), "rlvr": (5e-4, 2e-4, 1e-3), "rlhf": (5e-4, 2e-4, 1e-3)}


def knob_of(paradigm: str, method: str):
    """The fixed knob of a method (its options in ``bench.rl.METHODS``): None, a keep fraction, or e.g. 'filter-1.0'."""
    opts = {} if method in UNTRAINED else SPECS[paradigm][method][1].options
    if not opts:
        return None
    if set(opts) == {"frac"}:
        return opts["frac"]
    return "-".join(str(v) for v in opts.values())


def lr_of(knob, budget_lr: float) -> float:
    """The learning rate a run's knob names (``real_common.with_lr``), or the budget's."""
    lr = split_lr(knob)[1]
    return budget_lr if lr is None else lr


# ----------------------------------------------------------------------------------------------------- one process
class RLWorker:
    """Holds the base model (also the frozen reference) and each (setting, seed)'s data for one process's runs."""

    def __init__(self, model_name: str, sizes: RealSizes, paradigm: str, recipe, lora: SFTRecipe, cache_dir,
                 warm: str = "none", device: str = "cpu"):
        from drpost.data.chat import ensure_pad_token
        from drpost.models import load_pretrained

        self.key = (model_name, sizes, paradigm, recipe, lora, str(cache_dir), warm, device)
        self.device = device
        self.model_name, self.sizes, self.paradigm, self.recipe, self.lora = model_name, sizes, paradigm, recipe, lora
        self.warm = warm
        self.cache_dir = Path(cache_dir)
        self.base, self.tok = load_pretrained(model_name)
        self.base.to(device)
        ensure_pad_token(self.tok)
        self.reward = reward_fn(self.tok)
        self._data: dict = {}

    def data(self, setting: str, seed: int) -> dict:
        from drpost.trainers.sft import encode_examples
        from drpost.world.settings import build_setting

        if (setting, seed) not in self._data:
            built = build_setting(sized(real_settings()[setting], self.sizes), seed)
            tok = self.tok
            d = {"built": built, "test": chat_examples(tok, built.target_test[:N_TEST]),
                 "target": chat_examples(tok, built.target_train),
                 "val_rows": encode_examples(tok, chat_examples(tok, built.target_val), 128),
                 "retention": {f: ex for f, ex in built.retention.items() if f != built.setting.target_family}}
            if self.paradigm != "dpo":  # RL prompts: the whole pool
                d["general"] = chat_examples(tok, built.general)
            else:
                d["general_raw"] = pair_pool(built, setting, seed)
                d["general"] = chat_examples(tok, d["general_raw"])
            self._data[setting, seed] = d
        return self._data[setting, seed]

    def rejected_replies(self, setting: str, seed: int) -> dict[str, list[str]]:
        """The base model's greedy replies to the general and target pair prompts: from the cache when it holds
        this model's replies to exactly these prompts, else generated and cached (written atomically)."""
        d = self.data(setting, seed)
        prompts = {"general": [e["prompt"] for e in d["general"]], "target": [e["prompt"] for e in d["target"]]}
        path = self.cache_dir / f"rejected__{setting}__s{seed}.json"
        if path.exists():
            c = json.loads(path.read_text())
            if (c["model"], c["max_new_tokens"]) == (self.model_name, REJECT_MAX_NEW) and \
                    all([x["prompt"] for x in c[k]] == prompts[k] for k in prompts):
                return {k: [x["reply"] for x in c[k]] for k in prompts}
        raw = {"general": d["general_raw"], "target": d["built"].target_train}
        t0 = time.perf_counter()
        replies = {k: base_replies(self.base, self.tok, raw[k]) for k in prompts}
        c = {"model": self.model_name, "max_new_tokens": REJECT_MAX_NEW, "setting": setting, "seed": seed,
             "seconds": round(time.perf_counter() - t0, 1),
             **{k: [{"prompt": p, "reply": r} for p, r in zip(prompts[k], replies[k])] for k in prompts}}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(self)}")
        tmp.write_text(json.dumps(c, indent=0))
        tmp.replace(path)
        return replies

    def pairs(self, setting: str, seed: int) -> dict[str, list[dict]]:
        d = self.data(setting, seed)
        if "pairs" not in d:
            replies = self.rejected_replies(setting, seed)
            rng = random.Random(f"{seed}-{setting}-rejected")
            d["pairs"] = {k: [dpo_pair(self.tok, e, r, rng) for e, r in zip(d[k], replies[k])]
                          for k in ("general", "target")}
        return d["pairs"]

    def start(self, setting: str, seed: int):
        """The model RL starts from and is anchored to (the reference of the KL and of the losses): the base model
        (``warm_start=none``), or the SFT warm start: FullTraining SFT on this seed's pool with the SFT sweep's
        recipe (``REAL_RECIPE``: LoRA r8, 40 steps), merged into the weights. The warm-start adapter is trained once
        per (setting, seed) and cached in ``cache/warm__<setting>__s<seed>/`` (with the recipe it was made with)."""
        if self.warm == "none":
            return self.base
        d = self.data(setting, seed)
        if "start" not in d:
            d["start"] = self._warm_start(setting, seed, d)
        return d["start"]

    def _warm_start(self, setting: str, seed: int, d: dict):
        from peft import PeftModel

        from drpost.trainers.sft import MethodSpec, train_sft

        path = self.cache_dir / f"warm__{setting}__s{seed}"
        recipe = replace(REAL_RECIPE, seed=seed)
        meta = {"model": self.model_name, "recipe": asdict(recipe), "sizes": asdict(self.sizes)}
        saved = json.loads((path / "warm_start.json").read_text()) if (path / "warm_start.json").exists() else {}
        if {k: saved.get(k) for k in meta} != meta:  # missing, or made by another model / recipe / sizes
            t0 = time.perf_counter()
            m = train_sft(copy.deepcopy(self.base), self.tok, chat_examples(self.tok, d["built"].general), d["target"],
                          MethodSpec("SFT warm start", "full_training"), recipe)
            tmp = path.with_name(f"{path.name}.tmp{id(self)}")
            m["model"].save_pretrained(str(tmp))
            (tmp / "warm_start.json").write_text(json.dumps({**meta, "seconds": round(time.perf_counter() - t0, 1)}))
            if path.exists():
                import shutil

                shutil.rmtree(path)
            tmp.replace(path)
            print(f"[bench real {self.paradigm}] {setting} seed={seed}: SFT warm start trained "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
        start = PeftModel.from_pretrained(copy.deepcopy(self.base), str(path)).merge_and_unload()
        start.eval()
        for p in start.parameters():
            p.requires_grad_(False)
        return start

    def evaluate(self, model, d: dict, ref) -> dict:
        from drpost.trainers.rl_common import evaluate_policy

        k = self.sizes.max_new_tokens
        ev = evaluate_policy(model, ref, self.tok, d["test"], self.reward_of(d), ROLLOUT_TOKENS,
                             retention=lambda m: {f: chat_exact_match(m, self.tok, ex, k)
                                                  for f, ex in d["retention"].items()}, check=strict_check)
        out = {"target_em": ev["em"], "kl": ev["kl"], "retention_em": ev["retention_em"],
               "retention_by_family": ev["retention_by_family"],
               "val_em": chat_exact_match(model, self.tok, d["built"].target_val, k),
               "val_loss": token_mean_loss(model, self.tok, d["val_rows"])}
        return out | self.reward_metrics(ev)

    def reward_of(self, d: dict):
        """The reward_fn of the evaluation's sampled replies (RLVR's shaped reward; a subclass's own)."""
        return self.reward

    def reward_metrics(self, ev: dict) -> dict:
        """What a record keeps of ``evaluate_policy``'s rewards: RLVR the sampled replies' mean shaped reward."""
        return {"target_reward": ev["sampled_reward"]} if self.paradigm == "rlvr" else {}

    def train(self, policy, start, setting: str, seed: int, spec, recipe) -> dict:
        """Train ``policy`` (the LoRA-wrapped start model) with the paradigm's trainer; returns {"model", "curve",
        "kept" (kept fractions), "skipped_steps", "seconds_per_step"} and any extra fields of the record."""
        pairs = self.pairs(setting, seed) if self.paradigm == "dpo" else None
        t1, extra = time.perf_counter(), {}
        if pairs is not None:
            from drpost.trainers.dpo import train_dpo

            m = train_dpo(policy, start, self.tok, pairs["general"], pairs["target"], spec, recipe)
            curve, kept = m["target_loss"], m["kept_frac"]
            fw = m["flipped_weight"]
            extra["flipped_weight"] = sum(fw) / len(fw) if fw else None
            extra["rejected_corrupted"] = sum(p["rejected_source"] == "corrupted" for p in pairs["general"])
        else:
            from drpost.trainers.rlvr import train_rlvr

            d = self.data(setting, seed)
            m = train_rlvr(policy, start, self.reward, self.tok, d["general"], d["target"], spec, recipe)
            curve = [r["target_reward"] for r in m["steps"]]
            kept = [r["kept_frac"] for r in m["steps"] if r["kept_frac"] is not None]
            extra["general_reward_curve"] = _downsample([r["general_reward"] for r in m["steps"]])
        return {"model": m["model"], "curve": curve, "kept": kept, "skipped_steps": m["skipped_steps"],
                "seconds_per_step": (time.perf_counter() - t1) / recipe.steps, **extra}

    def run(self, setting: str, method: str, knob, seed: int) -> dict:
        """Train (unless ``base``) and evaluate one (setting, method, knob, seed); returns the record."""
        from drpost.trainers.sft import prepare_model

        d = self.data(setting, seed)
        t0 = time.perf_counter()
        recipe = replace(self.recipe, seed=seed, lr=lr_of(knob, self.recipe.lr))
        steps_s, extra = None, {}
        start = self.start(setting, seed)
        if method == "base":
            model, label = self.base, "base (untrained)"
        elif method == "warm_start":
            if self.warm == "none":
                raise ValueError("method 'warm_start' needs warm_start=sft")
            model, label = start, "SFT warm start (RL starts here)"
        else:
            label, spec = SPECS[self.paradigm][method]
            torch.manual_seed(seed)  # the LoRA initialization
            policy = prepare_model(copy.deepcopy(start), self.lora)  # the reference: the frozen start model
            extra = self.train(policy, start, setting, seed, spec, recipe)
            model, steps_s, kept = extra.pop("model"), extra.pop("seconds_per_step"), extra.pop("kept")
            extra.update(curve=_downsample(extra["curve"]), kept_frac=sum(kept) / len(kept) if kept else None)
        ev = self.evaluate(model, d, start if method != "base" else self.base)
        budget = None if method in UNTRAINED else {**asdict(recipe), "finetuning": "lora", "lora_r": self.lora.lora_r,
                                                 "lora_alpha": self.lora.lora_alpha}
        return {"setting": setting, "method": method, "label": label, "knob": knob, "seed": seed,
                "model": self.model_name, "paradigm": self.paradigm, "start": "sft_warm_start" if self.warm == "sft"
                else "base", **ev,
                "target_family": d["built"].setting.target_family, "n_test": len(d["test"]),
                "seconds_per_step": steps_s, "wall_seconds": time.perf_counter() - t0, "budget": budget,
                "device": device_name(self.device),
                "sizes": asdict(self.sizes), **extra}


def _downsample(xs: list[float], points: int = 40) -> list[float]:
    if len(xs) <= points:
        return list(xs)
    w = len(xs) / points
    return [sum(xs[int(i * w):int((i + 1) * w)]) / len(xs[int(i * w):int((i + 1) * w)]) for i in range(points)]


_WORKER: RLWorker | None = None


def _init_worker(model_name, sizes, paradigm, recipe, lora, cache_dir, warm, device, cls, threads):
    """This process's worker, an instance of ``cls`` (``RLWorker``, or a subclass such as
    ``drpost.bench.real_rlhf.RLHFWorker``: passed in, so this module never imports its extensions); one already built
    for the same arguments is kept (the model loads once)."""
    global _WORKER
    torch.set_num_threads(threads)
    if type(_WORKER) is not cls or _WORKER.key != (model_name, sizes, paradigm, recipe, lora, str(cache_dir), warm,
                                                   device):
        _WORKER = cls(model_name, sizes, paradigm, recipe, lora, cache_dir, warm, device)


def _prepare(key):
    """What the runs of one (setting, seed) share and cache: the SFT warm start, the DPO pairs."""
    _WORKER.start(*key)
    if _WORKER.paradigm == "dpo":
        _WORKER.pairs(*key)


def _job(args):
    job, out_dir = args
    rec = _WORKER.run(*job)
    write_record(out_dir, rec)
    reward = "".join(f", {name} {rec[k]:.3f}" for k, name in (("target_reward", "target reward"),
                                                              ("rm_score", "RM score")) if k in rec)
    print(f"[bench real {rec['paradigm']}] {rec['setting']} {rec['label']} seed={rec['seed']}: target EM "
          f"{rec['target_em']:.3f}{reward}, KL {rec['kl']:.3f}, retention {rec['retention_em']:.3f} "
          f"({rec['wall_seconds']:.0f}s)", flush=True)


def run_jobs(jobs: list[tuple], out: Path, model_name: str, sizes: RealSizes, paradigm: str, recipe,
             lora: SFTRecipe, workers: int, warm: str = "none", worker_cls: type | None = None,
             device: str = "cpu") -> None:
    """Run the jobs whose record is missing: first what each (setting, seed) shares (the SFT warm start, the DPO
    pairs; one process each, so they are made once and cached), then the runs; ``workers`` processes with one torch
    thread each (or this one)."""
    todo = missing(jobs, out)
    if not todo:
        return
    prep = sorted({(s, seed) for s, m, _, seed in todo if m != "base"}) if paradigm == "dpo" or warm != "none" \
        else []
    args = (model_name, sizes, paradigm, recipe, lora, out / "cache", warm, device, worker_cls or RLWorker)
    if workers <= 1:
        _init_worker(*args, torch.get_num_threads())
        for key in prep:
            _prepare(key)
        for j in todo:
            _job((j, out))
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(min(workers, len(todo)), _init_worker, (*args, 1)) as pool:
        for _ in pool.imap_unordered(_prepare, prep):
            pass
        for _ in pool.imap_unordered(_job, [(j, out) for j in todo]):
            pass


def sweep(paradigm: str, settings: list[str], methods: list[str], seeds: list[int], out_dir: str | Path,
          model_name: str = MODEL_DEFAULT, sizes: RealSizes = REAL_SIZES, recipe=None, lora: SFTRecipe = LORA,
          workers: int = 2, warm: str | None = None, device: str = "cpu", lrs: list[float] | None = None,
          worker_cls: type | None = None, before: Callable[[list[tuple]], None] | None = None) -> list[dict]:
    """Every (setting, method, seed) run of ``paradigm`` whose record is missing, starting from the base model or the
    SFT warm start (``warm``: none | sft; None = ``WARM_DEFAULT``). Method knobs are fixed; the learning rate is
    tuned: every trained method runs each of ``lrs`` (None = ``LR_GRID``, or the recipe's lr) on the first seed, and
    the one with the best validation EM runs the other seeds (``drpost.bench.records.tuned_sweep``). ``worker_cls``
    runs the jobs (None = ``RLWorker``); ``before(jobs)``, when given, runs in this process ahead of each batch of
    missing jobs (RLHF trains its reward model there). Returns every record on disk for these settings, methods and
    seeds."""
    out = Path(out_dir)
    recipe = recipe or BUDGETS[paradigm]
    warm = warm or WARM_DEFAULT[paradigm]
    lrs = list(lrs or LR_GRID.get(paradigm, (recipe.lr,)))

    def knob_values(m: str) -> list:
        k = knob_of(paradigm, m)
        return [k] if m in UNTRAINED else [with_lr(k, lr, recipe.lr) for lr in lrs]

    def run(jobs: list[tuple]) -> None:
        if before is not None:
            before(jobs)
        run_jobs(jobs, out, model_name, sizes, paradigm, recipe, lora, workers, warm, worker_cls, device)

    tuned_sweep(settings, methods, seeds, out, knob_values, run)
    return [r for r in load_records(out) if r.get("paradigm") == paradigm and r["setting"] in settings
            and r["method"] in methods and r["seed"] in seeds]


# --------------------------------------------------------------------------------------------------------- CLI
READ_COMMON = frozenset({"paradigm", "output_dir", "model", "settings", "methods", "seeds", "steps",
                         "general_batch_size", "target_batch_size", "lr", "max_grad_norm", "lora_r", "lora_alpha",
                         "workers", "device", "rewrite", "warm_start"})
READ = {"dpo": READ_COMMON | {"max_length", "warmup_ratio", "beta", "lrs"}, "rlvr": READ_COMMON | {"group_size", "lrs"}}


def recipe_of(config):
    """The paradigm's budget (``BUDGETS``) with the options given; ``none`` options keep the budget's value."""
    b = BUDGETS[config.paradigm]

    def given(value, default):
        return default if value is None else value

    common = {"steps": given(config.steps, b.steps), "lr": given(config.lr, b.lr),
              "max_grad_norm": config.max_grad_norm}
    if config.paradigm == "dpo":
        return replace(b, general_batch_size=given(config.general_batch_size, b.general_batch_size),
                       target_batch_size=config.target_batch_size, max_length=config.max_length,
                       warmup_ratio=config.warmup_ratio, beta=config.beta, **common)
    return replace(b, prompts_per_step=given(config.general_batch_size, b.prompts_per_step),
                   target_prompts=config.target_batch_size, group_size=config.group_size, **common)


def resolve_runs(config, default_methods: list[str], default_warm: str) -> tuple[list[str], list[str], str]:
    """(settings, methods, warm start) of a ``BenchRealConfig`` for dpo / rlvr / rlhf: ``settings`` / ``methods``
    left at their (SFT) defaults mean ``RL_SETTINGS`` / ``default_methods`` (the ``warm_start`` row only where RL
    starts there), ``warm_start=auto`` means ``default_warm``. An unknown setting or method, or the warm-start row
    without a warm start, is refused naming its option (ConfigError)."""
    from drpost.config import BenchRealConfig, ConfigError

    p, default = config.paradigm, BenchRealConfig()
    settings = list(RL_SETTINGS) if config.settings == default.settings else list(config.settings)
    known = real_settings()
    for s in settings:
        if s not in known:
            raise ConfigError(f"option 'settings': {s!r} is not a real-model setting; choose from {', '.join(known)}")
    warm = default_warm if config.warm_start == "auto" else config.warm_start
    methods = list(config.methods)
    if config.methods == default.methods:
        methods = [m for m in default_methods if m != "warm_start" or warm == "sft"]
    for m in methods:
        if m == "warm_start" and warm != "sft":
            raise ConfigError("option 'methods': 'warm_start' (the SFT warm start's row) needs warm_start=sft")
        if m not in UNTRAINED and m not in SPECS[p]:
            raise ConfigError(f"option 'methods': {m!r} is not a {p} method; choose from base, warm_start, "
                              f"{', '.join(SPECS[p])}")
    return settings, methods, warm


def lr_grid(paradigm: str, recipe=None):
    """``resolve`` for ``claim_output``: ``lr`` / ``lrs`` as the learning rates a sweep tunes over (as ``sweep``
    resolves them: ``LR_GRID``, else the recipe's lr), in order."""
    recipe = recipe or recipe_of
    return lambda c: {"lr": None, "lrs": sorted(lrs_of(c) or LR_GRID.get(paradigm, (recipe(c).lr,)))}


def lrs_of(config) -> list[float] | None:
    """The learning rates a sweep tunes over: ``lrs``, or ``lr`` alone, or None (the paradigm's ``LR_GRID``); both
    given is refused naming them (ConfigError)."""
    from drpost.config import ConfigError

    if config.lr is not None and config.lrs is not None:
        raise ConfigError("options 'lr' and 'lrs': give one (lr: that learning rate only; lrs: the ones tuned)")
    return list(config.lrs) if config.lrs is not None else [config.lr] if config.lr is not None else None


def run(config) -> dict:
    """``drpost bench real paradigm=dpo|rlvr`` (called by ``drpost.bench.real.run``): the sweep, then the report.

    ``settings`` / ``methods`` left at their (SFT) defaults mean this paradigm's (``RL_SETTINGS``, ``RL_METHODS``);
    options the paradigm does not read (``READ``) are refused by name."""
    from drpost.bench.quiet import quiet_libraries
    from drpost.bench.real_rl_report import write_report
    from drpost.config import ConfigError, refuse_unread

    p = config.paradigm
    refuse_unread(config, READ[p], f"bench real paradigm={p}")
    settings, methods, warm = resolve_runs(config, RL_METHODS[:1] + ["warm_start"] + RL_METHODS[1:],
                                           WARM_DEFAULT[p])
    lrs = lrs_of(config)
    out = output_dir_of(config)
    made_by = claim_output(config, out, f"drpost bench real paradigm={p}", lr_grid(p), settings=list(settings),
                           methods=list(methods))  # the lists resolved, not the SFT defaults they were left at
    if not config.rewrite:
        from drpost.models import resolve_model

        resolve_model(config.model)  # a missing model fails here, saying what to run
        lora = replace(LORA, lora_r=config.lora_r, lora_alpha=config.lora_alpha)
        device = device_of(config)
        recipe = recipe_of(config)
        with quiet_libraries(False):
            sweep(p, settings, methods, [int(s) for s in config.seeds], out, config.model, REAL_SIZES, recipe, lora,
                  config.workers, warm, device, lrs)
    records = [r for r in load_records(out) if r.get("paradigm") == p]
    if not records:
        raise ConfigError(f"option 'output_dir': no {p} records in {out / 'raw'}")
    return write_report(records, out, made_by)


__all__ = ["BUDGETS", "LR_GRID", "N_PAIRS", "N_TEST", "PARTIAL", "READ", "RLWorker", "RL_METHODS", "RL_SETTINGS", "UNTRAINED",
           "WARM_DEFAULT", "base_replies", "chosen_text", "dpo_pair", "knob_of", "pair_pool", "recipe_of",
           "lr_grid", "lr_of", "lrs_of", "resolve_runs", "reward_fn", "run", "run_jobs", "shaped_reward", "strict_check", "sweep", "with_lr"]
