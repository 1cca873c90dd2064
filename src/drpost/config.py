"""Run configuration: the dataclasses that are the single source of truth for every option, and their parser.

Owns
- the config dataclasses: shared groups (``ModelConfig``, ``RegularizerConfig``, ``OptimConfig``, ``DataConfig``,
  ``LogConfig``), trainer groups (``DPOParams``, ``PPOParams``, ``GRPOParams``) and one top-level config per
  subcommand (``DemoConfig``, ``SFTConfig``, ``DPOConfig``, ``RLHFConfig``, ``RLVRConfig``, ``BenchConfig``), listed
  in the explicit table ``CONFIGS``. Every field carries its help text in ``field(metadata={"help": ...})``, plus
  optional checks ``min`` / ``max`` / ``gt`` (strictly greater) / ``choices`` / ``pattern``.
- ``parse_config(cls, argv)``: defaults <- YAML files (``--config a.yaml``, overrides only, nested by group, applied
  in order) <- command-line overrides (``group.key=value``, ``--group.key value``, ``--group.key=value``, applied in
  order). Values are coerced from the annotations (int, float, bool, str, Literal, Optional, unions, lists, tuples),
  unknown keys are rejected with the closest valid name, and ranges are checked. YAML is read with
  ``yaml.safe_load`` only: a config can never import or run code.
- ``to_dict`` / ``save_resolved`` (writes ``config.yaml`` into a run directory; it re-loads with ``--config``),
  ``validate``, ``help_text(cls)`` (the CLI's ``--help``) and ``config_reference_markdown()``.

Regenerate the reference:  python -m drpost.config            (writes docs/configuration.md)
Check it is up to date:    python -m drpost.config --check
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml


class ConfigError(ValueError):
    """A bad option: unknown key, wrong type, out of range, or an unreadable config file."""


# ----------------------------------------------------------------------------------------------------------------
# Names shared with the rest of the package (checked against feasible/kernels/bench by tests/test_options_read.py).

Method = Literal["full_training", "target_only", "global_subset", "layerwise_subset", "hull", "capped_simplex", "cone",
                 "span", "ball", "halfspace", "gem"]
Baseline = Literal["mixing", "random", "dsir", "less", "greats", "iif"]
BenchMethod = Literal["full_training", "target_only", "mixing", "random_subset", "dsir", "less", "greats",
                      "global_subset", "layerwise_subset", "hull", "capped_simplex", "ball_auto", "gem",
                      "layerwise_hull_slack", "cone", "span", "halfspace", "iif"]
Scoring = Literal["auto", "full_ghost", "reduced_ghost", "direct", "compress"]
DataFormat = Literal["auto", "prompt_completion", "messages", "text", "preference", "prompt_answer"]

_NONE_WORDS = ("none", "null", "~", "")
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


def _opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
         **checks: Any) -> Any:
    """A dataclass field with its help text and optional checks (min, max, gt, choices, pattern) in metadata."""
    if not help:
        raise TypeError("every config field needs help text")
    unknown = set(checks) - {"min", "max", "gt", "choices", "pattern"}
    if unknown:
        raise TypeError(f"unknown field checks {sorted(unknown)}")
    metadata = {"help": help, **checks}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ----------------------------------------------------------------------------------------------------------------
# Shared groups.

@dataclass
class ModelConfig:
    """Which model to post-train and how its weights are made trainable."""

    name_or_path: str = _opt("world", "Hugging Face model id or local directory of a causal LM; 'world' = the "
                                      "built-in tiny Llama-style base model of the benchmark world (see model.size); "
                                      "an alias set up by 'drpost model fetch' (smollm2-135m-instruct); or a local "
                                      ".gguf file (converted once, see model.gguf_file).")
    gguf_file: str | None = _opt(None, "A local GGUF file to load (a path, or a file name inside the folder "
                                       "model.name_or_path); converted once into a safetensors folder in the drpost "
                                       "cache, keyed by its sha256. none = no GGUF.")
    size: Literal["micro", "tiny"] = _opt("tiny", "Size of the built-in world model (drpost.world.model."
                                                  "MODEL_SIZES; only used when model.name_or_path is 'world').")
    finetuning: Literal["full", "lora", "meso"] = _opt(
        "full", "Which weights train: 'full' = all weights; 'lora' = PEFT LoRA adapters only (only adapter weights "
                "are trainable and scored); 'meso' = all weights with the MeSO optimizer (AdamW moments kept in "
                "each layer's sketch space, see regularizer.sketch).")
    lora_r: int = _opt(8, "LoRA rank (finetuning=lora).", min=1)
    lora_alpha: float = _opt(16.0, "LoRA scaling alpha; the adapter update is scaled by alpha / r.", gt=0)
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA adapter input.", min=0, max=1)
    lora_target_modules: str = _opt("all-linear", "Modules that get LoRA adapters: 'all-linear' or a comma-separated "
                                                  "list of module name suffixes such as 'q_proj,v_proj'.")
    dtype: Literal["auto", "float32", "bfloat16", "float64"] = _opt(
        "auto", "Parameter dtype: 'auto' = bfloat16 on a GPU that supports it, else float32.")
    gradient_checkpointing: bool = _opt(False, "Recompute activations in the backward pass to save memory.")
    trust_remote_code: bool = _opt(False, "Allow a hub model to run its own Python code (off by default: only "
                                          "enable for repositories you trust).")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = _opt(
        None, "Attention kernel passed to transformers; none = the transformers default.")


@dataclass
class RegularizerConfig:
    """The feasible set that turns the general batch into a regularizer (docs/design.md, sections 2-4)."""

    method: Method = _opt("layerwise_subset", "Feasible set: full_training, target_only, global_subset, "
                                              "layerwise_subset (the paper's family), or a convex set hull, "
                                              "capped_simplex, cone, span, ball, halfspace, gem.")
    frac: float = _opt(0.5, "Subset methods: with selection topk, the fraction of the general batch kept; with "
                            "filter, the fraction of negatively aligned samples dropped.", min=0, max=1)
    selection: Literal["topk", "filter", "greedy"] = _opt(
        "topk", "Subset selection rule: topk by score, filter out negative scores, or greedy second-order "
                "(GREATS-style).")
    scope: Literal["global", "layer"] | None = _opt(
        None, "One selection for the whole model (global) or one per layer (layer); none = the method's own "
              "(global_subset: global, layerwise_subset: layer, convex sets: global).")
    k: int | None = _opt(None, "Greedy selection: samples picked; capped_simplex: the cap 1/k. none = "
                               "round(frac x general batch size).", min=1)
    radius: float | Literal["auto"] | None = _opt(
        None, "Ball radius (method ball): a number, or 'auto' = the target gradient's standard error.", min=0)
    slack: float | Literal["auto"] | None = _opt(
        None, "Add a ball of this radius around any feasible set (C + ball(r)); 'auto' = the target gradient's "
              "standard error; none = no slack.", min=0)
    scoring: Scoring = _opt("auto", "How per-sample inner products are computed: auto (per-layer cost model), "
                                    "full_ghost, reduced_ghost, direct, compress (random sketch, approximate).")
    assembly: Literal["one_pass", "two_pass"] = _opt(
        "one_pass", "one_pass = assemble the update from the captured activations and output gradients of one "
                    "backward; two_pass = reference mode with a second forward/backward on the weighted samples.")
    sketch: str = _opt("64x64", "Sketch size k_out x k_in of the compress scoring method and of MeSO.",
                       pattern=r"^[1-9][0-9]*x[1-9][0-9]*$")
    seed: int = _opt(0, "Seed of the random sketches (fixed for a whole run).", min=0)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (AdamW; MeSO when model.finetuning is meso)."""

    lr: float = _opt(1e-5, "Peak learning rate.", gt=0, max=10)
    weight_decay: float = _opt(0.0, "Decoupled weight decay.", min=0)
    warmup_ratio: float = _opt(0.03, "Fraction of the steps spent in linear warm-up.", min=0, max=1)
    schedule: Literal["linear", "cosine", "constant"] = _opt("linear", "Learning-rate decay after warm-up.")
    max_grad_norm: float | None = _opt(1.0, "Clip the update's global norm to this value; none = no clipping.", gt=0)
    betas: tuple[float, float] = _opt((0.9, 0.999), "Adam betas (beta1, beta2), e.g. '0.9,0.95'.", min=0, max=1)
    eps: float = _opt(1e-8, "Adam epsilon.", gt=0)


@dataclass
class DataConfig:
    """Where the general and target data come from and how they are tokenized (drpost.data)."""

    general: str | None = _opt(None, "General data: a local .jsonl / .json / .parquet file or a Hugging Face "
                                     "datasets name; none = the built-in world's general pool (data.setting).")
    target: str | None = _opt(None, "Target data (the few high-fidelity examples): a local file or a datasets "
                                    "name; none = the built-in world's target set (data.setting).")
    eval: str | None = _opt(None, "Evaluation data (same formats); none = the world's test set, or no evaluation "
                                  "when general/target are files.")
    general_config: str | None = _opt(None, "datasets configuration name of the general data (hub datasets only).")
    target_config: str | None = _opt(None, "datasets configuration name of the target data (hub datasets only).")
    general_split: str = _opt("train", "Split of the general data (hub datasets only).")
    target_split: str = _opt("train", "Split of the target data (hub datasets only).")
    eval_split: str = _opt("test", "Split of the evaluation data (hub datasets only).")
    format: DataFormat = _opt("auto", "Record format; auto = detect from the keys of the first record "
                                      "(prompt/completion, messages, text, prompt/chosen/rejected, prompt/answer).")
    max_seq_length: int = _opt(1024, "Tokens per sequence after truncation (prompt kept first); a record left "
                                     "with no loss tokens is handled by data.overlong.", min=1)
    overlong: Literal["error", "skip", "truncate_prompt"] = _opt(
        "error", "drpost sft: a record whose prompt leaves no completion token within data.max_seq_length is an "
                 "error naming its file and line (error), dropped with a logged count (skip), or kept with its "
                 "prompt cut from the left (truncate_prompt).")
    max_general_samples: int | None = _opt(None, "Use only the first N general records; none = all.", min=1)
    max_target_samples: int | None = _opt(None, "Use only the first N target records (the paper uses 16); "
                                                "none = all.", min=1)
    setting: str = _opt("default", "Benchmark-world setting used when general/target are not given "
                                   "(see drpost.world).")


@dataclass
class LogConfig:
    """Logging of metrics during a run (metrics.json is always written)."""

    log_every: int = _opt(10, "Log training metrics every N steps.", min=1)
    tensorboard: bool = _opt(False, "Also write TensorBoard event files under output_dir/tb.")
    wandb: bool = _opt(False, "Also log to Weights & Biases (needs the wandb package and a login).")
    wandb_project: str = _opt("drpost", "Weights & Biases project name.")
    wandb_run_name: str | None = _opt(None, "Weights & Biases run name; none = the output directory's name.")


# ----------------------------------------------------------------------------------------------------------------
# Trainer-specific groups (read by drpost.trainers).

@dataclass
class DPOParams:
    """Direct preference optimization (offline pairs, frozen reference)."""

    beta: float = _opt(0.1, "DPO temperature beta on the log-ratio margin.", gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = _opt(
        "sigmoid", "Pair loss on the log-ratio margin h: sigmoid (DPO), ipo ((h - 1/(2 beta))^2) or hinge "
                   "(max(0, 1 - beta h)).")
    label_smoothing: float = _opt(0.0, "Conservative-DPO label smoothing (probability the preference is "
                                       "flipped).", min=0, max=0.5)
    reference: str | None = _opt(None, "Reference model id or path; none = a frozen copy of the initial model.")
    max_prompt_length: int | None = _opt(None, "Truncate prompts to this many tokens before appending a "
                                               "response; none = only data.max_seq_length applies.", min=1)


@dataclass
class PPOParams:
    """PPO for RLHF: rollouts, GAE, clipped policy and value losses, KL penalty to the reference."""

    rollout_batch_size: int = _opt(64, "Prompts rolled out per PPO round.", min=1)
    mini_batch_size: int = _opt(8, "Rollout records per PPO mini-batch (the general batch curated each step).",
                                min=1)
    ppo_epochs: int = _opt(4, "Passes over each round's rollouts.", min=1)
    clip_eps: float = _opt(0.2, "Policy ratio clip epsilon.", gt=0, max=1)
    value_clip: float | None = _opt(0.2, "Value-function clip range; none = no value clipping.", gt=0)
    kl_coef: float = _opt(0.02, "Initial coefficient of the per-token KL penalty to the reference.", min=0)
    adaptive_kl: bool = _opt(True, "Adapt kl_coef towards kl_target (Ziegler et al. 2019).")
    kl_target: float = _opt(6.0, "Target KL for the adaptive controller.", gt=0)
    kl_horizon: int = _opt(10000, "Horizon of the adaptive KL controller.", min=1)
    gamma: float = _opt(1.0, "Discount factor.", min=0, max=1)
    lam: float = _opt(0.95, "GAE lambda.", min=0, max=1)
    value_lr: float | None = _opt(None, "Learning rate of the value head; none = optim.lr.", gt=0)
    vf_coef: float = _opt(0.1, "Weight of the value loss.", min=0)
    whiten_advantages: bool = _opt(True, "Normalize advantages to zero mean and unit variance per round.")
    max_new_tokens: int = _opt(64, "Tokens generated per rollout.", min=1)
    temperature: float = _opt(1.0, "Sampling temperature of rollouts.", gt=0)
    top_p: float = _opt(1.0, "Nucleus sampling threshold of rollouts.", gt=0, max=1)
    target_objective: Literal["reward", "token_pg", "train_loss"] = _opt(
        "reward", "Objective whose gradient on the target prompts' rollouts is the target direction.")
    target_rollouts: int = _opt(2, "Target prompts rolled out per PPO round; each step's target batch is "
                                   "target_batch_size of their records.", min=1)
    baseline: Literal["none", "iif"] = _opt(
        "none", "iif = the IIF baseline: once per rollout round drop the records whose gradient opposes the "
                "target gradient, then train the PPO epochs with regularizer.method on the kept records.")


@dataclass
class GRPOParams:
    """GRPO for RLVR: group-relative advantages, clipped ratio, optional KL to the reference."""

    group_size: int = _opt(8, "Completions sampled per prompt.", min=2)
    prompts_per_step: int = _opt(4, "Prompts per step (each contributes group_size rollout records).", min=1)
    clip_eps: float = _opt(0.2, "Policy ratio clip epsilon.", gt=0, max=1)
    kl_coef: float = _opt(0.001, "Coefficient of the KL penalty to the reference; 0 = no reference model.", min=0)
    scale_rewards: bool = _opt(True, "Divide group-relative advantages by the group's reward std.")
    num_iterations: int = _opt(1, "Optimizer steps per batch of rollouts.", min=1)
    sample_unit: Literal["record", "group"] = _opt(
        "group", "What the regularizer treats as one sample: one rollout record, or one prompt's group.")
    max_new_tokens: int = _opt(64, "Tokens generated per completion.", min=1)
    temperature: float = _opt(1.0, "Sampling temperature.", gt=0)
    verifier: Literal["auto", "exact", "numeric", "contains", "world"] = _opt(
        "auto", "Reward 1 when the completion's answer matches: exact string, numeric value, substring, or the "
                "world task's own verifier; auto = world for world records (with a 'family'), else exact.")
    target_objective: Literal["reward", "token_pg", "train_loss"] = _opt(
        "reward", "Objective whose gradient on the target prompts' rollouts is the target direction.")


# ----------------------------------------------------------------------------------------------------------------
# Top-level configs, one per subcommand.

@dataclass
class RunConfig:
    """Options every training run shares. Subclasses add their own and may change defaults."""

    allowed_formats: ClassVar[tuple[str, ...]] = ("auto", "prompt_completion", "messages", "text")

    output_dir: str = _opt("runs/run", "Directory for config.yaml, metrics.json, checkpoints and logs.")
    seed: int = _opt(0, "Random seed (data order, initialization of new heads, sampling).", min=0)
    steps: int = _opt(1000, "Optimizer steps (a resumed run may raise it to extend the run).", min=1)
    general_batch_size: int = _opt(8, "General samples per step (the regularizer's batch).", min=1)
    target_batch_size: int = _opt(1, "Target samples per step.", min=1)
    eval_every: int = _opt(100, "Evaluate every N steps; 0 = only at the end.", min=0)
    save_every: int = _opt(0, "Save a checkpoint every N steps and at the last step; 0 = no checkpoints (the "
                              "trained model is always saved to output_dir/final).", min=0)
    save_total_limit: int | None = _opt(None, "Keep only the newest N checkpoints; none = keep all.", min=1)
    resume: str | None = _opt(None, "Resume from a checkpoint directory, or 'auto' = the latest checkpoint in "
                                    "output_dir (a finished run is not retrained); none = start fresh. A resumed "
                                    "run reuses output_dir/config.yaml: other options given must agree with it, "
                                    "except steps (may grow), device, save_every, save_total_limit and log.*.")
    device: str = _opt("auto", "Device: auto (cuda if available, else cpu), cpu, mps, cuda or cuda:N.",
                       pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")
    model: ModelConfig = _opt(factory=ModelConfig, help="Model and fine-tuning mode.")
    regularizer: RegularizerConfig = _opt(factory=RegularizerConfig, help="Feasible set (the regularizer).")
    optim: OptimConfig = _opt(factory=OptimConfig, help="Optimizer and schedule.")
    data: DataConfig = _opt(factory=DataConfig, help="General, target and evaluation data.")
    log: LogConfig = _opt(factory=LogConfig, help="Metric logging.")


@dataclass
class SFTConfig(RunConfig):
    """Supervised fine-tuning: loss on completion / final assistant tokens only."""

    output_dir: str = _opt("runs/sft", "Directory for config.yaml, metrics.json, checkpoints and logs.")


@dataclass
class DPOConfig(RunConfig):
    """Offline preference optimization; one sample = one (chosen, rejected) pair."""

    allowed_formats: ClassVar[tuple[str, ...]] = ("auto", "preference")

    output_dir: str = _opt("runs/dpo", "Directory for config.yaml, metrics.json, checkpoints and logs.")
    optim: OptimConfig = _opt(factory=lambda: OptimConfig(lr=5e-7), help="Optimizer and schedule.")
    data: DataConfig = _opt(factory=lambda: DataConfig(format="preference"),
                            help="General, target and evaluation data.")
    dpo: DPOParams = _opt(factory=DPOParams, help="DPO loss.")


@dataclass
class RLHFConfig(RunConfig):
    """RLHF with PPO, a value head, a learned reward model and a KL penalty; curation on PPO mini-batches."""

    allowed_formats: ClassVar[tuple[str, ...]] = ("auto", "prompt_completion", "messages", "prompt_answer")

    output_dir: str = _opt("runs/rlhf", "Directory for config.yaml, metrics.json, checkpoints and logs.")
    steps: int = _opt(200, "PPO rounds.", min=1)
    reward_model: str | None = _opt(None, "Reward model id or path (sequence classifier); none = the world's "
                                          "learned reward model.")
    optim: OptimConfig = _opt(factory=lambda: OptimConfig(lr=1e-6), help="Optimizer and schedule.")
    ppo: PPOParams = _opt(factory=PPOParams, help="PPO.")


@dataclass
class RLVRConfig(RunConfig):
    """RL with verifiable rewards (GRPO); target prompts are drawn from a held-out split."""

    allowed_formats: ClassVar[tuple[str, ...]] = ("auto", "prompt_answer")

    output_dir: str = _opt("runs/rlvr", "Directory for config.yaml, metrics.json, checkpoints and logs.")
    steps: int = _opt(200, "GRPO steps.", min=1)
    optim: OptimConfig = _opt(factory=lambda: OptimConfig(lr=1e-6), help="Optimizer and schedule.")
    data: DataConfig = _opt(factory=lambda: DataConfig(format="prompt_answer"),
                            help="General, target and evaluation data.")
    grpo: GRPOParams = _opt(factory=GRPOParams, help="GRPO.")


@dataclass
class DemoConfig(RunConfig):
    """The world demo: SFT of the tiny world model with a few regularizers side by side, on two CPU cores."""

    output_dir: str = _opt("runs/demo", "Directory for config.yaml, metrics.json, checkpoints and logs.")
    steps: int = _opt(200, "Optimizer steps per method.", min=1)
    eval_every: int = _opt(0, "The demo evaluates each method once, at the end (0); other values are refused.",
                           min=0)
    methods: list[BenchMethod] = _opt(
        factory=lambda: ["full_training", "target_only", "dsir", "greats", "global_subset", "layerwise_subset",
                         "layerwise_hull_slack"],
        help="Methods compared, comma-separated (feasible sets and baselines).")
    verbose: bool = _opt(False, "Show the libraries' warnings, logs and progress bars (hidden by default so the "
                                "table prints cleanly).")
    optim: OptimConfig = _opt(factory=lambda: OptimConfig(lr=1e-3), help="Optimizer and schedule.")


@dataclass
class BenchConfig(RunConfig):
    """Quality benchmark ('drpost bench quality'): methods x settings x seeds on the world, tables and plots. The
    system benchmark ('drpost bench system') has its own options (BenchSystemConfig)."""

    kind: ClassVar[str] = "quality"  # the first positional argument of 'drpost bench'

    paradigm: Literal["sft", "dpo", "rlhf", "rlvr"] = _opt("sft", "Post-training paradigm benchmarked.")
    output_dir: str = _opt("runs/bench", "Directory for config.yaml, metrics.json, tables and plots.")
    steps: int = _opt(300, "Optimizer steps per run.", min=1)
    eval_every: int = _opt(0, "The benchmark evaluates each run once, at the end (0); other values are refused.",
                           min=0)
    methods: list[BenchMethod] = _opt(
        factory=lambda: ["full_training", "target_only", "mixing", "random_subset", "dsir", "less", "greats",
                         "global_subset", "layerwise_subset", "hull", "capped_simplex", "ball_auto", "gem",
                         "layerwise_hull_slack"],
        help="Methods compared, comma-separated (feasible sets and baselines).")
    settings: list[str] = _opt(factory=lambda: ["format_shift", "sparse_related", "distribution_shift"],
                               help="World settings, comma-separated (quality).")
    seeds: list[int] = _opt(factory=lambda: [0, 1, 2], help="Seeds, comma-separated; each seed draws the data "
                                                             "(pool, targets, test set) and the training.", min=0)
    rewrite: bool = _opt(False, "Rebuild summary.json, README.md and the plots of output_dir from its raw/ records "
                                "without training (the README's command and notes are kept).")
    optim: OptimConfig = _opt(factory=lambda: OptimConfig(lr=1e-3), help="Optimizer and schedule.")


@dataclass
class BenchSystemConfig:
    """System benchmark ('drpost bench system'): the cost of one regularized step split by component, as a ratio
    to a standard step, with analytic floors and the scoring-method crossovers."""

    kind: ClassVar[str] = "system"  # the first positional argument of 'drpost bench'

    output_dir: str = _opt("results/system", "Directory for system.json, metrics.json, summary.md and plots.")
    quick: bool = _opt(False, "The small grid sized for 2 CPU cores (~10 min); false = the full grid.")
    micro: bool = _opt(False, "One micro configuration (a smoke test, seconds).")
    repeats: int | None = _opt(None, "Timed repetitions per method after one warm-up; none = 5 (quick), 7 (full) "
                                     "or 1 (micro).", min=1)
    threads: int = _opt(1, "torch CPU threads while timing; 0 = leave torch's setting.", min=0)
    device: str = _opt("auto", "Device: auto (cuda if available, else cpu), cpu, cuda or cuda:N.",
                       pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")
    seq_lengths: list[int] | None = _opt(
        None, "Sequence lengths T: every grid configuration is timed at each length, and the reduced-ghost vs "
              "direct crossover sweeps these lengths; none = the grid's own lengths.", min=1)
    scorings: list[Scoring] = _opt(
        factory=lambda: ["auto", "full_ghost", "reduced_ghost", "direct", "compress"],
        help="Scoring methods whose rows are timed; the standard step, full_training and torch.func rows are "
             "always timed.")


CONFIGS: dict[str, type] = {
    "demo": DemoConfig,
    "sft": SFTConfig,
    "dpo": DPOConfig,
    "rlhf": RLHFConfig,
    "rlvr": RLVRConfig,
    "bench": BenchConfig,
}

@dataclass
class BenchMesoConfig:
    """MeSO vs AdamW ('drpost bench meso'): 'drpost sft' on one world setting with AdamW and with MeSO at two
    sketch sizes, same seeds and budget; target exact match and optimizer-state bytes."""

    kind: ClassVar[str] = "meso"  # the first positional argument of 'drpost bench'

    output_dir: str = _opt("results/meso", "Directory for summary.json and README.md.")
    runs_dir: str = _opt("runs/bench-meso", "Where the individual 'drpost sft' runs (and their checkpoints) go.")
    setting: str = _opt("distribution_shift", "World setting trained on (see drpost.world.settings).")
    steps: int = _opt(300, "Optimizer steps per run.", min=1)
    seeds: list[int] = _opt(factory=lambda: [0, 1], help="Seeds, comma-separated.", min=0)


# 'drpost bench' takes its config class from its first positional argument; CONFIGS["bench"] is the quality one.
BENCH_CONFIGS: dict[str, type] = {"quality": BenchConfig, "system": BenchSystemConfig, "meso": BenchMesoConfig}

GROUPS: tuple[type, ...] = (ModelConfig, RegularizerConfig, OptimConfig, DataConfig, LogConfig)


# ----------------------------------------------------------------------------------------------------------------
# Introspection.

@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = _hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _is_group(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def leaf_options(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """All settable options of a config class as (dotted name, field, type), groups flattened in field order."""
    out = []
    for f, tp in _fields(cls):
        if _is_group(tp):
            out.extend(leaf_options(tp, prefix + f.name + "."))
        else:
            out.append((prefix + f.name, f, tp))
    return out


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "none"
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(tp)) + "}"
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return "tuple[" + ", ".join(_type_name(a) for a in args) + "]"
        return f"list[{_type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


def _describe(tp: Any) -> str:
    """Human wording of what a type accepts, for error messages."""
    if tp is type(None):
        return "none"
    if _is_union(tp):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"{len(args)} comma-separated values"
        return "a comma-separated list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _literal_choices(tp: Any) -> list[str]:
    if _is_union(tp):
        return [c for a in typing.get_args(tp) for c in _literal_choices(a)]
    if typing.get_origin(tp) is Literal:
        return [str(a) for a in typing.get_args(tp)]
    return []


def _format_value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(_format_value(x) for x in v)
    return str(v)


# ----------------------------------------------------------------------------------------------------------------
# Coercion and checks.

class _Mismatch(Exception):
    """Internal: a value does not fit a type (message says what was expected)."""


def _coerce(value: Any, tp: Any) -> Any:
    """Convert a YAML or command-line value to the annotated type, or raise _Mismatch."""
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a)
            except _Mismatch:
                continue
        raise _Mismatch(f"expected {_describe(tp)}, got {value!r}")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value.strip() in choices:
            return value.strip()
        raise _Mismatch(f"expected {_describe(tp)}, got {value!r}")
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError as e:
                    raise _Mismatch(f"could not read {value!r} as a list: {e}") from None
            else:
                value = [p.strip() for p in text.split(",")] if text else []
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(f"expected {_describe(tp)}, got {value!r}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Mismatch(f"expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(_coerce(v, a) for v, a in zip(value, args))
        out = [_coerce(v, args[0]) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise _Mismatch(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip().replace("_", "")
            try:
                return int(text)
            except ValueError:
                try:
                    f = float(text)
                except ValueError:
                    f = math.nan
                if math.isfinite(f) and f.is_integer():
                    return int(f)
        raise _Mismatch(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                raise _Mismatch(f"expected a number, got {value!r}") from None
        else:
            raise _Mismatch(f"expected a number, got {value!r}")
        if not math.isfinite(out):
            raise _Mismatch(f"expected a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch(f"expected a string, got {value!r}")
    raise _Mismatch(f"unsupported option type {tp!r}")


def _check(value: Any, meta: Any) -> str | None:
    """Range / choice / pattern checks from field metadata; returns a problem or None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        for v in value:
            problem = _check(v, meta)
            if problem:
                return problem
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "min" in meta and value < meta["min"]:
            return f"{value!r} is out of range: must be >= {meta['min']}"
        if "gt" in meta and value <= meta["gt"]:
            return f"{value!r} is out of range: must be > {meta['gt']}"
        if "max" in meta and value > meta["max"]:
            return f"{value!r} is out of range: must be <= {meta['max']}"
    if isinstance(value, str):
        if "choices" in meta and value not in meta["choices"]:
            return f"{value!r} is not one of {', '.join(map(repr, meta['choices']))}"
        if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
            return f"{value!r} does not match the pattern {meta['pattern']}"
    return None


def _coerce_option(value: Any, tp: Any, f: dataclasses.Field, name: str, origin: str) -> Any:
    try:
        out = _coerce(value, tp)
    except _Mismatch as e:
        msg = f"option '{name}': {e}"
        close = difflib.get_close_matches(str(value), _literal_choices(tp), n=1, cutoff=0.5) \
            if isinstance(value, str) else []
        if close:
            msg += f"; did you mean '{close[0]}'?"
        raise ConfigError(f"{msg} (from {origin})") from None
    problem = _check(out, f.metadata)
    if problem:
        raise ConfigError(f"option '{name}': {problem} (from {origin})")
    return out


def _unknown(root: type, name: str, origin: str) -> ConfigError:
    options = [n for n, _, _ in leaf_options(root)]
    leaf = name.rsplit(".", 1)[-1]
    same_leaf = [n for n in options if n.rsplit(".", 1)[-1] == leaf]
    close = same_leaf or difflib.get_close_matches(name, options, n=1, cutoff=0.6) \
        or [n for n in options if n.rsplit(".", 1)[-1] in difflib.get_close_matches(
            leaf, [o.rsplit(".", 1)[-1] for o in options], n=1, cutoff=0.6)]
    hint = f"; did you mean '{close[0]}'?" if close else f"; run with --help to list the options of {root.__name__}"
    return ConfigError(f"unknown option '{name}' (from {origin}){hint}")


def _set(config: Any, name: str, value: Any, origin: str) -> None:
    """Set one dotted option on a config instance (a mapping value sets a group's fields)."""
    name = name.strip().replace("-", "_")
    parts = name.split(".")
    obj = config
    for i, part in enumerate(parts):
        by_name = {f.name: (f, tp) for f, tp in _fields(type(obj))}
        if part not in by_name:
            raise _unknown(type(config), name, origin)
        f, tp = by_name[part]
        if i < len(parts) - 1:
            if not _is_group(tp):
                raise _unknown(type(config), name, origin)
            obj = getattr(obj, part)
            continue
        if _is_group(tp):
            if isinstance(value, dict):
                for k, v in value.items():
                    _set(config, f"{name}.{k}", v, origin)
                return
            first = dataclasses.fields(tp)[0].name
            raise ConfigError(f"option '{name}' is a group of options, not a value (from {origin}); set one of its "
                              f"fields, e.g. {name}.{first}=...")
        setattr(obj, part, _coerce_option(value, tp, f, name, origin))


def refuse_unread(config: Any, read: set[str] | frozenset[str], command: str) -> None:
    """ConfigError naming every option of ``config`` that differs from its class default and is not in ``read``.

    For runners that take a shared config class but use only part of it: an option shown by ``--help`` then either
    changes the run or is refused by name.
    """
    default = type(config)()
    changed = []
    for name, _f, _tp in leaf_options(type(config)):
        a, b = config, default
        for part in name.split("."):
            a, b = getattr(a, part), getattr(b, part)
        if a != b and name not in read:
            changed.append(name)
    if changed:
        names = ", ".join(f"'{n}'" for n in changed)
        raise ConfigError(f"option{'s' if len(changed) > 1 else ''} {names} {'are' if len(changed) > 1 else 'is'} "
                          f"not used by drpost {command}; it reads only: {', '.join(sorted(read))}")


# ----------------------------------------------------------------------------------------------------------------
# Cross-field rules: (description, predicate on the config -> problem or None). Explicit list, run by validate().

def _rule_ball_radius(c: Any) -> str | None:
    reg = getattr(c, "regularizer", None)
    if reg is not None and reg.method == "ball" and reg.radius is None:
        return "regularizer.method=ball needs regularizer.radius (a number or 'auto')"
    return None


def _rule_format(c: Any) -> str | None:
    data = getattr(c, "data", None)
    allowed = getattr(type(c), "allowed_formats", None)
    if data is not None and allowed and data.format not in allowed:
        return f"data.format={data.format!r} is not usable by this command; expected one of {', '.join(allowed)}"
    return None


_RULES = [_rule_ball_radius, _rule_format]


def validate(config: Any) -> Any:
    """Re-check every option's type and range, then the cross-field rules; returns the config.

    ``parse_config`` calls it; call it yourself after building or editing a config in Python.
    """
    for name, f, tp in leaf_options(type(config)):
        obj = config
        parts = name.split(".")
        for part in parts[:-1]:
            obj = getattr(obj, part)
        setattr(obj, parts[-1], _coerce_option(getattr(obj, parts[-1]), tp, f, name, "the config object"))
    for rule in _RULES:
        problem = rule(config)
        if problem:
            raise ConfigError(problem)
    return config


# ----------------------------------------------------------------------------------------------------------------
# Parsing.

def load_yaml(path: str | Path) -> dict:
    """Read a YAML file of overrides with ``yaml.safe_load`` (never executes code); {} for an empty file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of options, got {type(data).__name__}")
    return data


def _split_argv(cls: type, argv: list[str]) -> tuple[list[str], list[tuple[str, Any]]]:
    """Separate ``--config`` files from (key, value) overrides."""
    bool_options = {n for n, _, tp in leaf_options(cls) if tp is bool}
    files: list[str] = []
    overrides: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise ConfigError(f"{tok} needs a YAML file")
            files.append(argv[i + 1])
            i += 2
            continue
        if tok.startswith("--config="):
            files.append(tok.split("=", 1)[1])
        elif tok.startswith("--"):
            body = tok[2:]
            if "=" in body:
                key, value = body.split("=", 1)
                overrides.append((key, value))
            else:
                key = body.replace("-", "_")
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                is_bool = key in bool_options
                if nxt is not None and not nxt.startswith("--") and \
                        (not is_bool or nxt.strip().lower() in _TRUE_WORDS + _FALSE_WORDS):
                    overrides.append((body, nxt))
                    i += 1
                elif is_bool:
                    overrides.append((body, True))
                else:
                    known = {n for n, _, _ in leaf_options(cls)}
                    if key not in known:
                        raise _unknown(cls, key, "the command line")
                    raise ConfigError(f"option '{key}' needs a value: --{key} VALUE or {key}=VALUE")
        elif "=" in tok and not tok.startswith("-"):
            key, value = tok.split("=", 1)
            overrides.append((key, value))
        else:
            raise ConfigError(f"unexpected argument {tok!r}: give options as key=value, --key value, --key=value, "
                              f"or --config file.yaml")
        i += 1
    return files, overrides


def parse_config(cls: type, argv: list[str] | tuple[str, ...] = ()) -> Any:
    """Build a validated ``cls`` instance from defaults, YAML files and command-line overrides.

    Precedence: dataclass defaults < every ``--config`` file, in order < command-line overrides, in order.
    Raises ConfigError for unknown keys (with the closest valid name), bad types, out-of-range values.
    """
    files, overrides = _split_argv(cls, list(argv))
    config = cls()
    for path in files:
        for key, value in load_yaml(path).items():
            if not isinstance(key, str):
                raise ConfigError(f"{path}: option names must be strings, got {key!r}")
            _set(config, key, value, origin=str(path))
    for key, value in overrides:
        _set(config, key, value, origin="the command line")
    return validate(config)


# ----------------------------------------------------------------------------------------------------------------
# Output.

def to_dict(config: Any) -> dict:
    """Nested plain dict (lists, not tuples) of a config, in field order; YAML- and JSON-safe."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(config)


def command_of(config_or_cls: Any) -> str | None:
    cls = config_or_cls if isinstance(config_or_cls, type) else type(config_or_cls)
    if cls in (BenchSystemConfig, BenchMesoConfig):
        return f"bench {cls.kind}"
    return next((name for name, c in CONFIGS.items() if c is cls), None)


def save_resolved(config: Any, out_dir: str | Path) -> Path:
    """Write the resolved config to ``out_dir/config.yaml`` (creating the directory); returns the file's path.

    The file re-loads to an equal config: ``drpost <command> --config out_dir/config.yaml``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "config.yaml"
    command = command_of(config) or type(config).__name__
    header = f"# Resolved drpost {command} config. Rerun: drpost {command} --config {path.name}\n"
    path.write_text(header + yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False),
                    encoding="utf-8")
    return path


def _wrap(text: str, indent: str, width: int) -> str:
    return textwrap.fill(text, width=width, initial_indent=indent, subsequent_indent=indent)


def help_text(cls: type, width: int = 110) -> str:
    """Per-option help for ``--help``: name, type, default and help text, grouped as in the dataclass."""
    default = cls()
    lines: list[str] = []
    top, groups = [], []
    for f, tp in _fields(cls):
        (groups if _is_group(tp) else top).append((f, tp))

    def emit(name: str, f: dataclasses.Field, tp: Any, value: Any) -> None:
        lines.append(f"  {name}: {_type_name(tp)} = {_format_value(value)}")
        lines.append(_wrap(f.metadata["help"], " " * 6, width))

    lines.append("options:")
    for f, tp in top:
        emit(f.name, f, tp, getattr(default, f.name))
    for gf, gtp in groups:
        lines.append("")
        lines.append(f"{gf.name}: {gf.metadata['help']}")
        group_value = getattr(default, gf.name)
        for f, tp in _fields(gtp):
            emit(f"{gf.name}.{f.name}", f, tp, getattr(group_value, f.name))
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(rows: list[tuple[str, Any, Any, dataclasses.Field]]) -> list[str]:
    out = ["| option | type | default | help |", "|---|---|---|---|"]
    for name, tp, value, f in rows:
        out.append(f"| `{name}` | {_md_cell(_type_name(tp))} | `{_md_cell(_format_value(value))}` "
                   f"| {_md_cell(f.metadata['help'])} |")
    return out


def config_reference_markdown() -> str:
    """The markdown reference of every command's options (docs/configuration.md)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the dataclasses in `src/drpost/config.py` by `python -m drpost.config`; do not edit by hand.",
        "",
        "Every subcommand (`drpost demo|sft|dpo|rlhf|rlvr|bench`) takes its options from, in increasing precedence:",
        "the defaults below, YAML files given with `--config file.yaml` (overrides only, nested by group, applied in",
        "order), then command-line overrides `group.key=value`, `--group.key value` or `--group.key=value`.",
        "Lists are comma-separated (`seeds=0,1,2`); `none` / `null` sets an optional value to none; booleans accept",
        "true/false/yes/no/on/off/1/0, and a bare `--flag` means true. Unknown options are rejected with the closest",
        "valid name. Every run writes the resolved `config.yaml` into its `output_dir`.",
        "",
        "Example:",
        "",
        "```",
        "drpost sft --config my.yaml regularizer.method=hull optim.lr=1e-4 --data.max_seq_length 512",
        "```",
        "",
        "## Shared option groups",
        "",
    ]
    for group in GROUPS:
        names = [f.name for cls in CONFIGS.values() for f, tp in _fields(cls) if tp is group]
        prefix = names[0] if names else group.__name__
        lines += [f"### `{prefix}.*` ({group.__name__})", "", (group.__doc__ or "").strip(), ""]
        inst = group()
        lines += _md_table([(f"{prefix}.{f.name}", tp, getattr(inst, f.name), f) for f, tp in _fields(group)])
        lines.append("")
    lines += ["## Commands", ""]
    for command, cls in [*CONFIGS.items(), ("bench system", BenchSystemConfig), ("bench meso", BenchMesoConfig)]:
        inst = cls()
        lines += [f"### `drpost {command}` ({cls.__name__})", "", " ".join((cls.__doc__ or "").split()), ""]
        allowed = getattr(cls, "allowed_formats", None)
        if allowed:
            lines += [f"Data formats: {', '.join(allowed)}.", ""]
        top = [(f.name, tp, getattr(inst, f.name), f) for f, tp in _fields(cls) if not _is_group(tp)]
        lines += _md_table(top)
        lines.append("")
        for gf, gtp in _fields(cls):
            if not _is_group(gtp):
                continue
            value = getattr(inst, gf.name)
            if gtp in GROUPS:
                base = gtp()
                changed = [(f"{gf.name}.{f.name}", getattr(value, f.name)) for f, _ in _fields(gtp)
                           if getattr(value, f.name) != getattr(base, f.name)]
                if changed:
                    lines.append(f"Defaults that differ from the shared `{gf.name}.*` group: "
                                 + ", ".join(f"`{n}={_format_value(v)}`" for n, v in changed) + ".")
                    lines.append("")
            else:
                lines += [f"#### `{gf.name}.*` ({gtp.__name__})", "", (gtp.__doc__ or "").strip(), ""]
                lines += _md_table([(f"{gf.name}.{f.name}", tp, getattr(value, f.name), f)
                                    for f, tp in _fields(gtp)])
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m drpost.config [PATH] [--check]``: write (or check) the markdown reference."""
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [a for a in args if a != "--check"]
    path = Path(paths[0] if paths else "docs/configuration.md")
    text = config_reference_markdown()
    if check:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            print(f"{path} is out of date: run python -m drpost.config", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
