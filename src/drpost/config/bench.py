"""The benchmarks' option schema (``drpost bench quality|system|meso|real``) and the command tables ``CONFIGS``
(one config class per ``drpost`` subcommand) and ``BENCH_CONFIGS`` (one per ``drpost bench`` kind). The shared groups
and the training commands' configs are ``schema.py``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from drpost.config.schema import (
    BenchMethod,
    DemoConfig,
    DPOConfig,
    Method,
    OptimConfig,
    RLHFConfig,
    RLVRConfig,
    RunConfig,
    Scoring,
    SFTConfig,
    _opt,
)


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
                         "layerwise_hull_slack", "guided_global_subset", "guided_layerwise_subset", "guided_hull",
                         "dsir_prefilter_layerwise_subset", "dsir_prefilter_hull", "less_prefilter_layerwise_subset"],
        help="Methods compared, comma-separated (feasible sets, baselines, and their compositions).")
    settings: list[str] = _opt(factory=lambda: ["format_shift", "sparse_related", "distribution_shift"],
                               help="World settings, comma-separated (quality).")
    seeds: list[int] = _opt(factory=lambda: [0, 1, 2], help="Seeds, comma-separated; each seed draws the data "
                                                             "(pool, targets, test set) and the training. The first "
                                                             "is the tuning seed (every knob value runs on it); a "
                                                             "sweep directory keeps the seed it was tuned on (the "
                                                             "first of its config.yaml), so seeds=3,4 adds two "
                                                             "seeds with the knobs tuned there.", min=0)
    rewrite: bool = _opt(False, "Rebuild summary.json, README.md and the plots of output_dir from its raw/ records "
                                "without training (the README's command and notes are kept).")
    optim: OptimConfig = _opt(factory=lambda: OptimConfig(lr=1e-3), help="Optimizer and schedule.")


@dataclass
class BenchSystemConfig:
    """System benchmark ('drpost bench system'): the cost of one regularized step split by component, as a ratio
    to a standard step, with analytic floors, peak memory and counted FLOPs per method and the scoring-method
    crossovers, on tiny Llama sizes or SmolLM2-135M's shapes (option model)."""

    kind: ClassVar[str] = "system"  # the first positional argument of 'drpost bench'

    output_dir: str = _opt("results/system", "Directory for system.json, metrics.json, summary.md and plots.")
    model: Literal["tiny", "smollm2"] = _opt(
        "tiny", "tiny: Llama sizes 1M-50M (vocabulary 512). smollm2: LlamaForCausalLM with SmolLM2-135M-Instruct's "
                "config and random weights (no download): full fine-tuning and LoRA r8 (alpha 16, every linear "
                "layer), T 64 and 256, n 8 and 32 general rows, 1 target row, the core methods, with floors and "
                "peak memory (hours on one CPU thread, and tens of GB of memory for full fine-tuning at T 256, n 32; "
                "quick = T 64, n 8 only; micro = a 2-layer, 1,024-token SmolLM2 at T 16, seconds).")
    quick: bool = _opt(False, "The small grid sized for 2 CPU cores (~10 min for tiny); false = the full grid.")
    micro: bool = _opt(False, "One micro configuration (two for smollm2: full and LoRA; a smoke test, seconds).")
    repeats: int | None = _opt(None, "Timed repetitions per method after one warm-up; none = 5 (quick), 7 (full) "
                                     "or 1 (micro); 3 for smollm2 (1 with micro).", min=1)
    threads: int = _opt(1, "torch CPU threads while timing; 0 = leave torch's setting.", min=0)
    clock: Literal["wall", "cpu"] = _opt(
        "wall", "CPU timings: wall = elapsed time; cpu = this process's CPU time (all threads), which with "
                "threads=1 stays meaningful on a machine other jobs share. CUDA always uses CUDA events.")
    precision: Literal["fp32", "bf16"] = _opt(
        "fp32", "fp32, or bf16 = every method's forward and backward under bf16 autocast (weights and AdamW stay "
                "fp32; floors from GEMM rates calibrated in bf16; the torch.func anchor is left out). CPUs without "
                "AVX512-BF16 emulate bf16 and run it slower than fp32.")
    device: str = _opt("auto", "Device: auto (cuda if available, else cpu), cpu, cuda or cuda:N.",
                       pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")
    seq_lengths: list[int] | None = _opt(
        None, "Sequence lengths T: every grid configuration is timed at each length, and the reduced-ghost vs "
              "direct crossover sweeps these lengths; none = the grid's own lengths.", min=1)
    batch_sizes: list[int] | None = _opt(
        None, "General rows n: every grid configuration is timed at each of these (the crossovers keep theirs); "
              "none = the grid's own.", min=1)
    scorings: list[Scoring] = _opt(
        factory=lambda: ["auto", "full_ghost", "reduced_ghost", "direct", "compress"],
        help="Scoring methods whose rows are timed; the standard step, full_training and torch.func rows are "
             "always timed.")
    prompt_frac: float = _opt(0.0, "Share of each row's leading tokens that are a prompt without labels: the loss, "
                                   "and the LM head with it, runs only on the window after it, and the floors "
                                   "price the head there. Every configuration is then timed without and with the "
                                   "prompt, back to back, and summary.md compares the pairs (what the window "
                                   "saves); 0 = every position a label.", min=0.0, max=0.99)
    resume: bool = _opt(True, "Keep the configurations that a stopped run with the same options, device, threads "
                              "and clock wrote to output_dir/system.json, and measure only the others; false = "
                              "measure every configuration again.")



@dataclass
class BenchTRLConfig:
    """TRL adapters' step time ('drpost bench trl'): DrSFTTrainer, DrDPOTrainer and DrGRPOTrainer against their plain
    TRL trainers (SFTTrainer, DPOTrainer, GRPOTrainer), single process on CPU, on a random-weight Llama (no download;
    drpost's byte tokenizer, a larger model vocabulary so the embedding and LM head cost what they would). Every
    trainer x variant (plain; plain_union, the plain trainer on the general rows plus the adapter's target rows;
    then each method) trains the same steps from the same weights; a TrainerCallback times on_step_begin ->
    on_step_end (data, forward, backward, clipping, optimizer; GRPO: generation too) on the wall and the process CPU
    clocks; after one untimed run of each trainer, variants run interleaved over rounds (order rotated each round);
    the tables give the median over rounds of the median step after the warm-up, and its ratios to the plain
    trainer and to plain_union. The regularized trainers take 1 target sample a step (pair for DPO, prompt x 4
    generations for GRPO) and subset methods keep frac 0.5."""

    kind: ClassVar[str] = "trl"  # the first positional argument of 'drpost bench'

    output_dir: str = _opt("results/system/trl", "Directory for trl.json, summary.md and ratios.png.")
    trainers: list[Literal["sft", "dpo", "grpo"]] = _opt(factory=lambda: ["sft", "dpo", "grpo"],
                                                         help="TRL trainers timed, comma-separated.")
    methods: list[Method] = _opt(
        factory=lambda: ["global_subset", "layerwise_subset"],
        help="drpost methods (dr_method) timed beside the plain trainer, comma-separated; subset methods keep frac "
             "0.5 (GRPO: selection filter), other methods run with their defaults (a method that needs an option "
             "is refused).")
    hidden: int = _opt(256, "Model width: hidden // 64 heads (at least 1) of an even size each (hidden must split "
                            "evenly); MLP width 8/3 x hidden.", min=2)
    layers: int = _opt(4, "Decoder layers.", min=1)
    vocab: int = _opt(8192, "Model vocabulary (embedding and untied LM head rows); at least the byte tokenizer's "
                            "259 tokens.", min=1)
    seq: int = _opt(64, "Tokens per row: prompt seq/2 - 1 bytes, completion (chosen, rejected) seq/2 - 1 bytes; "
                        "GRPO generates up to seq/2 tokens.", min=8)
    batch: int = _opt(8, "General rows per step: SFT rows, DPO pairs, GRPO completions (batch/4 prompts x 4 "
                         "generations: a multiple of 4).", min=1)
    steps: int = _opt(4, "Optimizer steps per trainer run.", min=1)
    warmup: int = _opt(1, "Steps left out of each run's median (fewer than steps and grpo_steps).", min=0)
    repeats: int = _opt(2, "Rounds: each round runs every trainer x variant once.", min=1)
    grpo_steps: int | None = _opt(None, "Optimizer steps per GRPO run; none = steps.", min=1)
    grpo_repeats: int | None = _opt(None, "Rounds for GRPO (its step is noisier: sampled completions); none = "
                                          "repeats.", min=1)
    precision: Literal["fp32", "bf16"] = _opt(
        "fp32", "fp32 (bf16=False), or bf16 = TRL's default config (bf16=True: forward under bf16 autocast, the "
                "adapters' too). CPUs without AVX512-BF16 emulate bf16 and run it slower than fp32.")
    threads: int = _opt(1, "torch CPU threads while timing; 0 = leave torch's setting.", min=0)
    clock: Literal["wall", "cpu"] = _opt(
        "wall", "The clock of the headline ratio (summary.md's bold column, ratios.png; both clocks are recorded): "
                "wall = elapsed time; cpu = this process's CPU time (all threads), which with threads=1 stays "
                "meaningful on a machine other jobs share.")
    micro: bool = _opt(False, "A smoke configuration, seconds: hidden 64, 1 layer, vocab 259, seq 16, batch 4, 2 "
                              "steps, 1 warm-up, 1 round; the size and schedule options are then refused.")


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


@dataclass
class BenchRealConfig:
    """Real-model benchmark ('drpost bench real'): world settings as chat turns on a pretrained LLM (LoRA), SFT, DPO,
    RLVR or RLHF, methods x settings x seeds, one record per finished run (re-running skips finished runs, and refuses
    to change the recipe of a directory that holds runs), tables and plots."""

    kind: ClassVar[str] = "real"  # the first positional argument of 'drpost bench'

    paradigm: Literal["sft", "dpo", "rlvr", "rlhf"] = _opt(
        "sft", "sft: the chat rows; dpo: pairs with the base model's own reply rejected; rlvr: GRPO with the world's "
               "verifiers (partial credit 0.25 for the answer inside a longer first line); rlhf: PPO on a reward "
               "model trained on the setting's preference pairs (scored on target EM and on the reward at a fixed "
               "KL). Options a paradigm does not read are refused.")
    output_dir: str = _opt("", "Directory for raw/ (one JSON record per run), cache/ (dpo: the base model's "
                               "replies; rlvr, rlhf: the SFT warm starts; rlhf: the reward model), summary.json, "
                               "tables.md and the plots; empty = results/real/<paradigm>.")
    model: str = _opt("smollm2-135m-instruct", "The model post-trained: an alias set up by 'drpost model fetch', a "
                                               "local Hugging Face folder, or a hub name where a hub is reachable.")
    settings: list[str] = _opt(factory=lambda: ["sparse_related", "format_shift"],
                               help="Real-model settings (drpost.bench.real_common.real_settings), comma-separated; "
                                    "dpo, rlvr and rlhf: this default means format_shift only.")
    methods: list[str] = _opt(
        factory=lambda: ["base", "full_training", "target_only", "mixing", "dsir", "less", "greats", "global_subset",
                         "layerwise_subset", "hull", "dsir_prefilter_hull", "less_prefilter_hull"],
        help="Methods, comma-separated: 'base' (the untrained model) and, sft: any method of 'drpost bench "
             "quality' (LESS scores each seed's whole pool once, about 1.7 CPU-hours on SmolLM2, kept checkpoint by "
             "checkpoint under output_dir/less/ so that an interrupted scoring resumes; the LESS-prefiltered methods "
             "read the same scores); dpo, rlvr, rlhf: a method of 'drpost bench quality --paradigm dpo|rlvr|rlhf' "
             "(this default means base, full_training, target_only, global_subset, layerwise_subset, hull; rlhf adds iif; rlvr "
             "and rlhf add warm_start, the SFT warm start's row, where they start there).")
    seeds: list[int] = _opt(factory=lambda: [0, 1, 2], help="Seeds, comma-separated; each seed draws the data "
                                                             "(pool, 16 targets, validation/test) and the training. "
                                                             "The first is the tuning seed (every knob value runs on "
                                                             "it, the others take the value its validation split "
                                                             "chose). A sweep directory keeps the seed it was tuned "
                                                             "on (the first of its config.yaml), so seeds=3,4 adds "
                                                             "two seeds to it with the knobs tuned there.",
                            min=0)
    steps: int | None = _opt(None, "Optimizer steps per run (rlhf: PPO rounds); none = the paradigm's budget (sft "
                                   "40, dpo 12, rlvr 8, rlhf 5).", min=1)
    general_batch_size: int | None = _opt(None, "General rows (sft), pairs (dpo) or prompts (rlvr) per step, "
                                                "general rollouts per PPO round (rlhf); none = the paradigm's budget "
                                                "(sft 8, dpo 8, rlvr 4, rlhf 8).", min=1)
    target_batch_size: int = _opt(1, "Target rows (sft), pairs (dpo) or prompts (rlvr) per step (rlhf: fixed, 4 "
                                     "target rollouts a round, 2 a step).", min=1)
    max_length: int = _opt(128, "Longest tokenized row (prompt + answer; sft, dpo).", min=8)
    lr: float | None = _opt(None, "Peak learning rate (AdamW; sft, dpo: linear warm-up and decay, rlvr, rlhf: "
                                  "constant); none = the paradigm's budget (sft 1e-3, dpo 5e-4, rlvr 5e-4, rlhf "
                                  "5e-4).", gt=0, max=10)
    lrs: list[float] | None = _opt(None, "Learning rates every trained method runs with on the first seed (dpo, "
                                         "rlvr, rlhf); the one with the best validation EM (ties: lower validation "
                                         "loss) runs the other seeds; none = dpo 5e-4,2e-4,1e-3, rlvr "
                                         "5e-4,2e-4,1e-3, rlhf 5e-4,2e-4,1e-3 (with lr given: that lr only). Not "
                                         "with lr. A run list, like seeds: another rate adds its tuning runs to an "
                                         "output_dir that holds a sweep.", gt=0, max=10)
    warmup_ratio: float = _opt(0.03, "Fraction of the steps spent in linear warm-up (sft, dpo).", min=0, max=1)
    beta: float = _opt(0.1, "DPO's beta (dpo only).", gt=0)
    group_size: int = _opt(4, "Sampled replies per prompt, GRPO's group (rlvr only).", min=2)
    kl_coef: float = _opt(0.05, "PPO's KL penalty coefficient, per token, against the start model (rlhf only).",
                          min=0)
    warm_start: Literal["auto", "none", "sft"] = _opt(
        "auto", "Where dpo/rlvr/rlhf start and what their KL is measured to: none = the base model; sft = the SFT "
                "warm start (FullTraining SFT on the seed's pool with the sft recipe, merged; trained once per "
                "setting and seed, cached in cache/, and a 'warm_start' row of the tables); auto = sft for rlvr and "
                "rlhf, none for dpo.")
    max_grad_norm: float | None = _opt(1.0, "Clip the update's global norm; none = no clipping.", gt=0)
    lora_r: int = _opt(8, "LoRA rank (adapters on every linear layer).", min=1)
    lora_alpha: float = _opt(16.0, "LoRA alpha.", gt=0)
    bf16: bool = _opt(False, "Forward and backward under bf16 autocast (weights and optimizer state stay fp32; sft "
                             "only); off by default: CPUs without AVX512-BF16 emulate bf16 (a real-model step was "
                             "18x slower).")
    workers: int = _opt(2, "Runs in parallel, one process and one torch thread each; 1 = this process with torch's "
                           "thread setting.", min=1)
    device: str = _opt("auto", "Device of every model (policy, reference, reward model, LESS / GREATS scoring): auto "
                               "(cuda if available, else cpu), cpu, cuda or cuda:N; each record names it.",
                       pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")
    rewrite: bool = _opt(False, "Only rebuild summary.json, tables.md and the plots from the records in raw/.")

    def output_path(self) -> Path:
        """Where the run writes: ``output_dir``, or ``results/real/<paradigm>`` when it is empty."""
        return Path(self.output_dir or f"results/real/{self.paradigm}")


# 'drpost bench' takes its config class from its first positional argument; CONFIGS["bench"] is the quality one.
BENCH_CONFIGS: dict[str, type] = {"quality": BenchConfig, "system": BenchSystemConfig, "meso": BenchMesoConfig,
                                   "real": BenchRealConfig, "trl": BenchTRLConfig}


CONFIGS: dict[str, type] = {
    "demo": DemoConfig,
    "sft": SFTConfig,
    "dpo": DPOConfig,
    "rlhf": RLHFConfig,
    "rlvr": RLVRConfig,
    "bench": BenchConfig,
}
