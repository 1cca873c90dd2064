"""The option schema: ``ConfigError``, the config dataclasses (every field carries its help text and checks) and
the shared groups and the training commands' configs; the benchmarks' configs and the command tables
``CONFIGS`` / ``BENCH_CONFIGS`` are ``bench.py``. Parsing is ``parse.py``, output ``render.py``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal


class ConfigError(ValueError):
    """A bad option: unknown key, wrong type, out of range, or an unreadable config file."""


# ----------------------------------------------------------------------------------------------------------------
# Names shared with the rest of the package (checked against feasible/kernels/bench by tests/test_options_read.py).

Method = Literal["full_training", "target_only", "global_subset", "layerwise_subset", "hull", "capped_simplex", "cone",
                 "span", "ball", "halfspace", "gem"]
Baseline = Literal["mixing", "random", "dsir", "less", "greats", "iif"]
BenchMethod = Literal["full_training", "target_only", "mixing", "random_subset", "dsir", "less", "greats",
                      "global_subset", "layerwise_subset", "hull", "capped_simplex", "ball_auto", "gem",
                      "layerwise_hull_slack", "cone", "span", "halfspace", "iif", "guided_global_subset",
                      "guided_layerwise_subset", "guided_hull", "dsir_prefilter_layerwise_subset", "dsir_prefilter_hull",
                      "less_prefilter_layerwise_subset", "less_prefilter_hull", "dsir_prefilter_ball_auto",
                      "less_prefilter_ball_auto", "dsir_prefilter_layerwise_subset_2n",
                      "less_prefilter_layerwise_subset_2n"]
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

    shorthand: ClassVar[str] = "name_or_path"  # 'model=X' / '--model X' sets model.name_or_path

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
class SamplerConfig:
    """How each step's general batch is drawn from the pool (drpost.trainers.samplers; README "Samplers")."""

    mode: Literal["uniform", "guided"] = _opt(
        "uniform", "uniform = every pool row equally likely (as before); guided = rows drawn from a distribution "
                   "learned online from each step's alignment scores <u_i, g_T>: ridge regression on hashed token "
                   "n-grams of the rows, softmax of its predictions mixed with a uniform floor.")
    exploration: float = _opt(0.2, "Guided: weight eps of the uniform floor (every row keeps probability >= "
                                   "eps / pool size).", gt=0, max=1)
    temperature: float = _opt(1.0, "Guided: softmax temperature, in units of the predictions' standard "
                                   "deviation (smaller = more concentrated).", gt=0)
    dim: int = _opt(512, "Guided: hashed feature dimension of the predictor.", min=1)
    ridge: float = _opt(1.0, "Guided: ridge penalty of the predictor.", gt=0)
    decay: float = _opt(0.98, "Guided: per-step forgetting factor of the predictor's statistics (it follows "
                              "the target gradient as training moves it).", gt=0, max=1)
    refresh: int = _opt(1, "Guided: recompute the pool's predictions every N steps.", min=1)
    prefilter: Literal["none", "dsir", "less"] = _opt(
        "none", "Offline prefilter of the general pool before training, keeping sampler.prefilter_frac of the rows: "
                "dsir = importance resampling on hashed word n-grams of the decoded rows; less = the top LESS scores "
                "(a LoRA warm-up on 5% of the pool, then Adam-preconditioned gradient cosine to the target rows over "
                "4 checkpoints; costs about 16 forward/backward passes per pool row). The regularizer then works "
                "within the kept rows.")
    prefilter_frac: float = _opt(0.1, "Fraction of the general pool the prefilter keeps.", gt=0, max=1)
    candidates: int = _opt(1, "Draw candidates x general_batch_size rows (of the pool, or of the prefilter's kept "
                              "rows) each step: a candidate batch for a subset set, which with frac = 1/candidates "
                              "trains on general_batch_size of them (e.g. prefilter=dsir, candidates=2, "
                              "layerwise_subset frac=0.5).", min=1)


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
    sampler: SamplerConfig = _opt(factory=SamplerConfig, help="How the general batch is drawn from the pool.")


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
    steps: int | None = _opt(None, "Optimizer steps per method; none = 200 on the world model, 25 on a real model "
                                   "(model.name_or_path, e.g. --model smollm2-135m-instruct).", min=1)
    eval_every: int = _opt(0, "The demo evaluates each method once, at the end (0); other values are refused.",
                           min=0)
    methods: list[BenchMethod] = _opt(
        factory=lambda: ["full_training", "target_only", "dsir", "greats", "global_subset", "layerwise_subset",
                         "layerwise_hull_slack"],
        help="Methods compared, comma-separated (feasible sets and baselines).")
    verbose: bool = _opt(False, "Show the libraries' warnings, logs and progress bars (hidden by default so the "
                                "table prints cleanly).")
    optim: OptimConfig = _opt(factory=lambda: OptimConfig(lr=1e-3), help="Optimizer and schedule.")


GROUPS: tuple[type, ...] = (ModelConfig, RegularizerConfig, OptimConfig, DataConfig, LogConfig)
