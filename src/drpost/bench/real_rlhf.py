"""The real-model RLHF benchmark: ``drpost bench real paradigm=rlhf`` (PPO on a learned reward model).

Same model, LoRA (r 8, alpha 16, every linear layer), seed-drawn data, methods' fixed knobs and resumable records as
the DPO / RLVR sweeps (``drpost.bench.real_rl``, whose ``RLWorker`` and job runner this module reuses; default
setting ``format_shift``).

Reward model (the judge, not the data): a one-logit sequence classifier on the same model
(``AutoModelForSequenceClassification``; LoRA r 8 / alpha 16 on every linear layer and a trainable score head,
``trainers.reward_model.lora_classifier``), Bradley-Terry (``train_reward_model``) on preference pairs built like the
DPO pairs (``real_rl.dpo_pair``: chosen = the terse answer, rejected = the base model's own greedy reply, or a
corrupted answer where the verifier accepts that reply) from seed 0's data: the ``N_PAIRS`` pool examples of the
DPO sweep and ``n_target`` target-family prompts drawn apart from the target splits (train, validation, test) of
seeds 0 .. ``exclude_seeds`` - 1. Every prompt gives a second pair against a corrupted answer, so that the judge sees
wrong terse answers as well as sentences. The last ``held_out_*`` prompts of each group are held out; their pair
accuracy (by group and by kind of rejected reply) is stored with the model and copied into every record. Trained
once per (model, setting) in the main process before any run, cached in
``output_dir/cache/reward_model__<setting>/`` (adapter, score head, ``reward_model.json`` with the recipe); a cache
made by another model, recipe or split sizes is trained again.

Policy: PPO (``trainers.rlhf.train_rlhf``, detached value head) from the SFT warm start (``warm_start=auto`` = sft:
``RLWorker.start``, as RLVR, cached per setting and seed in ``output_dir/cache/``; also the reference of the KL
penalty and of the evaluation's KL), LoRA r 8, the budget ``BUDGET`` (from a pilot: ~5.5 CPU-minutes a run). Methods: ``RLHF_METHODS``, knobs of the toy RLHF
benchmark (``bench.rl.METHODS["rlhf"]``: subsets keep half of each mini-batch, IIF drops records opposed to the
round's target gradient). The learning rate is tuned per method as in real_rl (``lrs``; default
``real_rl.LR_GRID["rlhf"]``: 5e-4, 2e-4, 1e-3 on the first seed, the best validation EM runs the other seeds); the
value head keeps the budget's ``value_lr``.

Evaluation: the real_rl one on ``N_TEST`` test targets (``target_em``, strict greedy, the true metric; ``kl`` k3 on
sampled replies; retention, validation) plus ``rm_score``, the reward model's mean score of sampled replies (and
``rm_score_greedy``). Reward vs KL: every trained run is also evaluated at round 0 (the start model, shared by the
methods of a seed), every ``curve_every(rounds)`` rounds and at the end on the first ``N_CURVE`` test targets (RM
score of sampled replies and KL to the reference): ``kl_curve``. The report (``write_report``) takes the largest KL
that every trained run reaches (``kl_budget``) and reads each run's RM score there (``reward_at_kl``, linear
interpolation along the run's curve): the reward at a fixed KL budget, beside target EM. Resumable as real_rl: one
record per finished run in ``output_dir/raw/``; the report (``summary.json``, ``tables.md``,
``reward_vs_kl_<setting>.png``) is rebuilt from every record on disk.

    drpost bench real paradigm=rlhf                       # results/real/rlhf
    drpost bench real paradigm=rlhf seeds=0 methods=base,warm_start,full_training,hull steps=4 lr=1e-4
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

from drpost.bench import real_rl
from drpost.bench.real_common import (
    MODEL_DEFAULT,
    REAL_SIZES,
    RealSizes,
    chat_examples,
    claim_output,
    device_of,
    output_dir_of,
    real_settings,
    sized,
)
from drpost.bench.real_rl import LORA, ROLLOUT_TOKENS, UNTRAINED, RLWorker
from drpost.bench.records import load_records
from drpost.bench.stats import mean_se, pm
from drpost.trainers.rlhf import RLHFRecipe
from drpost.trainers.sft import SFTRecipe

RLHF_METHODS = ["base", "warm_start", "full_training", "iif", "target_only", "global_subset", "layerwise_subset",
                "hull"]
N_CURVE = 24  # test targets of the reward-vs-KL curve points


def curve_every(rounds: int) -> int:
    """Rounds between two curve points: about two during a run, besides round 0 and the end."""
    return max(1, -(-rounds // 3))


# Pilot (smollm2-135m-instruct, format_shift, 1 thread, fp32, machine shared, 2 rounds from the base model): a round
# (8 + 4 rollouts of 10 tokens, 2 epochs x 2 mini-batches of 4 + 2 target records) ~26 CPU-s; a curve point (24
# targets, sampled replies) ~19 CPU-s; the RM's scores of 100 replies ~12 CPU-s, so the final evaluation ~140 CPU-s
# (real_rl's ~115 plus greedy and sampled RM scores). Hence 5 rounds: ~2.2 + ~1.0 (3 points) + ~2.3 = ~5.5 CPU-min.
BUDGET = RLHFRecipe(rounds=5, rollout_batch_size=8, target_rollouts=4, mini_batch_size=4, target_batch_size=2,
                    ppo_epochs=2, lr=5e-4, value_lr=1e-3, kl_coef=0.05, max_new_tokens=ROLLOUT_TOKENS,
                    eval_every=curve_every(5))
# Pilot: a Bradley-Terry step on 16 pairs (32 replies of ~35 tokens, LoRA) ~18 CPU-s; the base model's replies
# ~0.27 CPU-s a prompt. Hence 16 steps (~5 CPU-min of training; ~7.7 with the 352 replies and the pair accuracies),
# once per setting.
RM_RECIPE = {"steps": 16, "batch_size": 16, "lr": 1e-3, "warmup": 2, "lora_r": 8, "lora_alpha": 16.0, "n_target": 96,
             "held_out_general": 32, "held_out_target": 24, "exclude_seeds": 10, "version": 1}


# ---------------------------------------------------------------------------------------------------- reward model
def rm_pairs(base, tok, setting: str, sizes: RealSizes, recipe: dict) -> tuple[dict, list[str]]:
    """({"train", "held_out"}: preference pairs with "group" general|target), the target prompts used; see the
    module doc."""
    from drpost.world.settings import build_setting
    from drpost.world.tasks import make_example

    spec = sized(real_settings()[setting], sizes)
    built = build_setting(spec, 0)
    taken = set()
    for seed in range(recipe["exclude_seeds"]):
        b = built if seed == 0 else build_setting(spec, seed)
        taken |= {e["prompt"] for e in b.target_train + b.target_val + b.target_test}
    rng, target = random.Random(f"rm-{setting}-target"), []
    for _ in range(50 * recipe["n_target"]):
        if len(target) == recipe["n_target"]:
            break
        e = make_example(rng, spec.target_family, spec.target_format, spec.target_difficulty)
        if e["prompt"] not in taken:
            taken.add(e["prompt"])
            target.append(e)
    rng, out = random.Random(f"0-{setting}-rm-pairs"), {"train": [], "held_out": []}
    for group, raw in (("general", real_rl.pair_pool(built, setting, 0)), ("target", target)):
        replies = real_rl.base_replies(base, tok, raw)
        n = len(raw)
        for i, (e, reply) in enumerate(zip(chat_examples(tok, raw), replies)):
            split = "held_out" if i >= n - recipe[f"held_out_{group}"] else "train"
            # the DPO pair, and the same prompt against a corrupted answer (an empty reply is always replaced)
            out[split] += [{**real_rl.dpo_pair(tok, e, r, rng), "group": group} for r in (reply, "")]
    return out, [e["prompt"] for e in target]


def ensure_reward_model(model_name: str, setting: str, sizes: RealSizes, cache_dir, recipe: dict | None = None,
                        device: str = "cpu"):
    """(folder, info) of the setting's reward model: read from ``cache_dir/reward_model__<setting>/`` when it was
    made by this model with this recipe and these sizes, else trained (pairs, Bradley-Terry, held-out accuracy) and
    written there atomically."""
    recipe = recipe or RM_RECIPE
    path = Path(cache_dir) / f"reward_model__{setting}"
    meta = {"model": model_name, "setting": setting, "recipe": recipe, "sizes": asdict(sizes)}
    info_file = path / "reward_model.json"
    saved = json.loads(info_file.read_text()) if info_file.exists() else {}
    if {k: saved.get(k) for k in meta} == json.loads(json.dumps(meta)):
        return path, saved
    from drpost.data.chat import ensure_pad_token
    from drpost.models import load_pretrained, resolve_model
    from drpost.trainers import reward_model as rmod

    t0 = time.perf_counter()
    base, tok = load_pretrained(model_name)
    base.to(device)
    ensure_pad_token(tok)
    pairs, target_prompts = rm_pairs(base, tok, setting, sizes, recipe)
    del base
    t_pairs = time.perf_counter() - t0
    peft_model, classifier = rmod.lora_classifier(rmod.load_classifier(resolve_model(model_name)).to(device),
                                                  recipe["lora_r"], recipe["lora_alpha"])
    rm, metrics = rmod.train_reward_model(classifier, tok, pairs["train"], steps=recipe["steps"],
                                          batch_size=recipe["batch_size"], lr=recipe["lr"], seed=0,
                                          warmup=recipe["warmup"], train_accuracy_pairs=64)
    held = pairs["held_out"]
    acc = {"all": rmod.pair_accuracy(rm, rmod.encode_pairs(tok, held))}
    for group in ("general", "target"):
        for kind in ("base_reply", "corrupted"):
            sel = [p for p in held if p["group"] == group and p["rejected_source"] == kind]
            acc[f"{group}_vs_{kind}"] = rmod.pair_accuracy(rm, rmod.encode_pairs(tok, sel)) if sel else None
    info = {**meta, **metrics, "heldout_accuracy": acc, "pairs_seconds": round(t_pairs, 1),
            "seconds": round(time.perf_counter() - t0, 1), "target_prompts": target_prompts,
            "n_pairs": {k: len(v) for k, v in pairs.items()},
            "rejected_corrupted": sum(p["rejected_source"] == "corrupted" for p in pairs["train"])}
    tmp = path.with_name(f"{path.name}.tmp{id(info)}")
    peft_model.save_pretrained(str(tmp))
    (tmp / "reward_model.json").write_text(json.dumps(info, indent=1))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.replace(path)
    print(f"[bench real rlhf] {setting}: reward model trained ({info['seconds']:.0f}s), held-out pair accuracy "
          f"{acc['all']:.3f} (target vs base reply {acc['target_vs_base_reply']}, vs corrupted "
          f"{acc['target_vs_corrupted']})", flush=True)
    return path, info


# ----------------------------------------------------------------------------------------------------- one process
class RLHFWorker(RLWorker):
    """``RLWorker`` with PPO on the setting's cached reward model (``ensure_reward_model``), and its reward-vs-KL
    curve points (``sweep`` hands this class to ``real_rl.run_jobs``, whose processes build it)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._rm: dict = {}

    def reward_model(self, setting: str) -> tuple:
        """(reward_fn, info) of the setting's reward model, loaded once (merged into the classifier's weights)."""
        if setting not in self._rm:
            from drpost.models import resolve_model
            from drpost.trainers.reward_model import RewardModel, load_classifier
            from drpost.trainers.rlhf import rm_reward_fn

            path, info = ensure_reward_model(self.model_name, setting, self.sizes, self.cache_dir, device=self.device)
            model = load_classifier(resolve_model(self.model_name), adapter=path).to(self.device).eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self._rm[setting] = (rm_reward_fn(RewardModel(model, self.tok)), info)
        return self._rm[setting]

    def reward_of(self, d: dict):
        return self.reward_model(d["built"].setting.name)[0]

    def reward_metrics(self, ev: dict) -> dict:
        return {"rm_score": ev["sampled_reward"], "rm_score_greedy": ev["reward"]}

    def evaluate(self, model, d: dict, ref) -> dict:
        info = self.reward_model(d["built"].setting.name)[1]
        shared = set(info["target_prompts"]) & {e["prompt"] for e in d["built"].target_test}
        return super().evaluate(model, d, ref) | {"rm_heldout_accuracy": info["heldout_accuracy"],
                                                  "rm_test_overlap": len(shared)}

    def curve_point(self, model, ref, d: dict) -> dict:
        """RM score of sampled replies to the first ``N_CURVE`` test targets and the KL to ``ref`` on them."""
        from drpost.trainers.rl_common import evaluate_policy

        ev = evaluate_policy(model, ref, self.tok, d["test"][:N_CURVE], self.reward_of(d), ROLLOUT_TOKENS,
                             greedy=False)
        return {"kl": ev["kl"], "rm_score": ev["sampled_reward"]}

    def train(self, policy, start, setting: str, seed: int, spec, recipe) -> dict:
        from drpost.trainers.rlhf import train_rlhf

        d = self.data(setting, seed)
        if "curve0" not in d:  # round 0: the start model, the same for every method of the seed
            d["curve0"] = {"round": 0, **self.curve_point(start, start, d)}
        m = train_rlhf(policy, start, self.reward_of(d), self.tok, d["general"], d["target"], spec, recipe,
                       eval_fn=lambda model, _round: self.curve_point(model, start, d))
        rounds = m["rounds"]
        return {"model": m["model"], "curve": [r["target_score"] for r in rounds],
                "kept": [r["kept_frac"] for r in rounds], "skipped_steps": m["skipped_steps"],
                "seconds_per_step": m["train_seconds"] / recipe.rounds,
                "kl_curve": [d["curve0"]] + [{"round": e["round"], "kl": e["kl"], "rm_score": e["rm_score"]}
                                              for e in m["evals"]],
                "general_score_curve": [r["general_score"] for r in rounds],
                "train_kl_curve": [r["kl"] for r in rounds]}


def sweep(settings: list[str], methods: list[str], seeds: list[int], out_dir: str | Path,
          model_name: str = MODEL_DEFAULT, sizes: RealSizes = REAL_SIZES, recipe: RLHFRecipe = BUDGET,
          lora: SFTRecipe = LORA, workers: int = 2, warm: str = "sft", device: str = "cpu",
          lrs: list[float] | None = None) -> list[dict]:
    """Every (setting, method, seed) run whose record is missing (``real_rl.sweep`` with ``RLHFWorker``: the learning
    rate tuned on the first seed's validation EM over ``lrs``, None = ``LR_GRID["rlhf"]``), the setting's reward
    model trained or read first, here, once; returns every record on disk for these settings, methods and seeds."""
    out = Path(out_dir)

    def reward_models(jobs: list[tuple]) -> None:
        for s in sorted({j[0] for j in jobs}):
            ensure_reward_model(model_name, s, sizes, out / "cache", device=device)

    return real_rl.sweep("rlhf", settings, methods, seeds, out, model_name, sizes, recipe, lora, workers, warm,
                         device, lrs, RLHFWorker, reward_models)


# ------------------------------------------------------------------------------------------------------- report
def kl_budget(curves: list[list[dict]]) -> float:
    """The largest KL every curve reaches (the smallest of the curves' largest KL)."""
    return min(max(p["kl"] for p in c) for c in curves)


def reward_at_kl(curve: list[dict], budget: float) -> float | None:
    """The RM score where the curve (points in training order) first reaches KL ``budget``, linearly interpolated
    between the two points around it; None when it never does."""
    pts = [(p["kl"], p["rm_score"]) for p in curve]
    if len(pts) == 1:
        return pts[0][1] if pts[0][0] == budget else None
    for (k0, r0), (k1, r1) in zip(pts, pts[1:]):
        if min(k0, k1) <= budget <= max(k0, k1):
            return r1 if k1 == k0 else r0 + (budget - k0) / (k1 - k0) * (r1 - r0)
    return None


def summarize(records: list[dict]) -> dict:
    """``real_rl_report.summarize`` plus ``rm_score`` and, for trained runs, ``rm_at_kl`` (the RM score at the
    setting's ``kl_budget``, stored per setting under each row's ``kl_budget``); runs that only served the
    learning-rate tuning are left out of both."""
    from drpost.bench.real_report import chosen_records
    from drpost.bench.real_rl_report import summarize as base_summary

    table = base_summary(records)
    records = chosen_records(records)
    for s, rows in table.items():
        rs = [r for r in records if r["setting"] == s]
        trained = [r for r in rs if r.get("kl_curve")]
        budget = kl_budget([r["kl_curve"] for r in trained]) if trained else None
        by = defaultdict(list)
        for r in trained:
            by[r["method"]].append(reward_at_kl(r["kl_curve"], budget))
        for m, row in rows.items():
            row["rm_score"] = mean_se([r["rm_score"] for r in rs if r["method"] == m])
            row["rm_at_kl"] = mean_se(by[m]) if by.get(m) else None
            row["kl_budget"] = budget
            row["rm_heldout_accuracy"] = next(r["rm_heldout_accuracy"] for r in rs if r["method"] == m)
            row["reference"] = "the SFT warm start" if rs[0].get("start") == "sft_warm_start" else "the base model"
    return table


def markdown(table: dict, command_line: str) -> str:
    def ordered(rows: dict) -> list[str]:  # the untrained rows first, then by target EM
        return sorted(rows, key=lambda m: (m != "base", m != "warm_start", -rows[m]["target_em"][0]))

    lines = [f"Command: `{command_line}`", ""]
    for s, rows in table.items():
        anyrow = next(iter(rows.values()))
        acc, budget = anyrow["rm_heldout_accuracy"], anyrow["kl_budget"]
        accs = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in acc.items() if v is not None)
        n = max(len(r["seeds"]) for r in rows.values())
        kl_txt = "" if budget is None else f"{budget:.3g}"
        lines += [f"### {s} (RLHF)", "",
                  f"Mean ± standard error over up to {n} seeds. Target EM: strict greedy exact match on the test "
                  "targets (the true metric); RM score: the reward model's mean score of sampled replies; RM @ KL "
                  f"{kl_txt}: the RM score where each run's reward-vs-KL curve ({N_CURVE} test targets) reaches KL "
                  f"{kl_txt}, the largest KL every trained run reaches; KL: to {anyrow['reference']} (nats per reply). "
                  f"Reward model held-out pair accuracy: {accs}.", "",
                  f"| method | knob | lr | target EM | RM score | RM @ KL {kl_txt} | KL | retention EM | val EM "
                  "| s/step | seeds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in ordered(rows):
            r = rows[m]
            sps = "" if r["seconds_per_step"] is None else f"{r['seconds_per_step']:.2f}"
            lr = "" if r.get("lr") is None else f"{r['lr']:g}"
            lines.append(f"| {r['label']} | {'' if r['knob'] is None else r['knob']} | {lr} | {pm(r['target_em'])} | "
                         f"{pm(r['rm_score'])} | {pm(r['rm_at_kl'])} | {pm(r['kl'])} | {pm(r['retention_em'])} "
                         f"| {pm(r['val_em'])} | {sps} | {len(r['seeds'])} |")
        lines += ["", verdict(rows), ""]
    return "\n".join(lines)


def verdict(rows: dict) -> str:
    """The best Dr method against FullTraining, Target-only and the untrained model on the true metric (as for
    RLVR), the proxy check against the warm start (RM score up, target EM not) and the best RM score at the KL
    budget."""
    from drpost.bench.real_rl_report import verdict as true_metric_verdict

    ref = rows.get("warm_start")
    parts = [true_metric_verdict(rows)]
    if ref is not None:
        proxy = [r["label"] for m, r in rows.items() if m not in UNTRAINED and r["rm_score"][0] > ref["rm_score"][0]
                 and r["target_em"][0] <= ref["target_em"][0]]
        parts.append(f"RM score above the warm start's ({ref['rm_score'][0]:.3f}) without target EM above its "
                     f"{ref['target_em'][0]:.3f} (a proxy win): {', '.join(proxy) or 'none'}.")
    at = {m: r["rm_at_kl"][0] for m, r in rows.items() if r.get("rm_at_kl")}
    if at:
        best = max(at, key=at.get)
        parts.append(f"Highest RM score at the KL budget: {rows[best]['label']} ({at[best]:.3f}).")
    return " ".join(parts)


def plots(records: list[dict], table: dict, out: Path) -> None:
    """``reward_vs_kl_<setting>.png``: RM score vs KL per method (curves, mean over seeds per point, the KL budget
    dashed) and target EM vs KL (final evaluation, every row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from drpost.bench.real_report import chosen_records, is_dr

    records = chosen_records(records)
    for s, rows in table.items():
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.4))
        for m, row in rows.items():
            color = "tab:red" if is_dr(m) else "tab:gray"
            curves = [r["kl_curve"] for r in records if r["setting"] == s and r["method"] == m and r.get("kl_curve")]
            if curves:
                n = min(len(c) for c in curves)
                xs = [sum(c[i]["kl"] for c in curves) / len(curves) for i in range(n)]
                ys = [sum(c[i]["rm_score"] for c in curves) / len(curves) for i in range(n)]
                ax.plot(xs, ys, "o-", ms=3, color=color, alpha=0.8)
                ax.annotate(row["label"], (xs[-1], ys[-1]), textcoords="offset points", xytext=(3, 2), fontsize=7)
            (x, xe), (y, ye) = row["kl"], row["target_em"]
            bx.errorbar(x, y, xerr=0 if xe != xe else xe, yerr=0 if ye != ye else ye, fmt="o", color=color, capsize=2)
            bx.annotate(row["label"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        budget, ref = next(iter(rows.values()))["kl_budget"], next(iter(rows.values()))["reference"]
        if budget is not None:
            ax.axvline(budget, ls="--", color="black", lw=0.8, label=f"KL budget {budget:.3g}")
            ax.legend(loc="best", fontsize=7)
        ax.set_xlabel(f"KL to {ref} ({N_CURVE} test targets, nats per reply)")
        ax.set_ylabel("RM score of sampled replies")
        ax.set_title(f"RLHF {s}: reward vs KL during training (red Dr)", fontsize=9)
        bx.set_xlabel(f"KL to {ref} (test targets, nats per reply)")
        bx.set_ylabel("target EM (test, greedy, strict)")
        bx.set_title(f"RLHF {s}: the true metric vs KL after training", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"reward_vs_kl_{s}.png", dpi=110)
        plt.close(fig)


def write_report(records: list[dict], out_dir: str | Path, command_line: str) -> dict:
    """summary.json (every record), tables.md and the reward-vs-KL plots of ``out_dir``."""
    from drpost.bench.real_report import write_files

    return write_files(records, out_dir, command_line, summarize, markdown, plots)


# --------------------------------------------------------------------------------------------------------- CLI
READ = (real_rl.READ_COMMON - {"target_batch_size"}) | {"kl_coef", "lrs"}


def recipe_of(config) -> RLHFRecipe:
    """``BUDGET`` with the options given (``steps`` = PPO rounds, ``general_batch_size`` = general rollouts per round;
    ``none`` keeps the budget's value); the curve points follow the rounds (``curve_every``)."""
    b = BUDGET
    rounds = b.rounds if config.steps is None else config.steps
    return replace(b, rounds=rounds, eval_every=curve_every(rounds), kl_coef=config.kl_coef,
                   rollout_batch_size=b.rollout_batch_size if config.general_batch_size is None
                   else config.general_batch_size, lr=b.lr if config.lr is None else config.lr,
                   max_grad_norm=config.max_grad_norm)


def run(config) -> dict:
    """``drpost bench real paradigm=rlhf`` (called by ``drpost.bench.real.run``): the sweep, then the report.
    ``settings`` / ``methods`` left at their (SFT) defaults mean ``RL_SETTINGS`` / ``RLHF_METHODS``; options the
    paradigm does not read (``READ``) are refused by name."""
    from drpost.bench.quiet import quiet_libraries
    from drpost.config import ConfigError, refuse_unread

    refuse_unread(config, READ, "bench real paradigm=rlhf")
    lrs = real_rl.lrs_of(config)
    settings, methods, warm = real_rl.resolve_runs(config, RLHF_METHODS, "sft")
    out = output_dir_of(config)
    made_by = claim_output(config, out, "drpost bench real paradigm=rlhf", real_rl.lr_grid("rlhf", recipe_of),
                           settings=list(settings), methods=list(methods))
    if not config.rewrite:
        from drpost.models import resolve_model

        resolve_model(config.model)  # a missing model fails here, saying what to run
        lora = replace(LORA, lora_r=config.lora_r, lora_alpha=config.lora_alpha)
        device = device_of(config)
        with quiet_libraries(False):
            sweep(settings, methods, [int(s) for s in config.seeds], out, config.model, REAL_SIZES,
                  recipe_of(config), lora, config.workers, warm, device, lrs)
    records = [r for r in load_records(out) if r.get("paradigm") == "rlhf"]
    if not records:
        raise ConfigError(f"option 'output_dir': no rlhf records in {out / 'raw'}")
    return write_report(records, out, made_by)


__all__ = ["BUDGET", "N_CURVE", "READ", "RLHFWorker", "RLHF_METHODS", "RM_RECIPE", "curve_every",
           "ensure_reward_model", "kl_budget", "markdown", "recipe_of", "reward_at_kl", "rm_pairs", "run",
           "summarize", "sweep", "write_report"]
