"""TRL adapters: ``DrSFTTrainer``, ``DrDPOTrainer``, ``DrGRPOTrainer`` (data-regularized TRL trainers).

Owns the glue between TRL's trainers (``trl>=1.0,<2``; tested with 1.16) and :class:`drpost.DataRegularizer`:

    trainer = DrSFTTrainer(model=model, args=SFTConfig(...), train_dataset=general, target_dataset=target,
                           processing_class=tok, dr_method="global_subset", dr_options={"frac": 0.5})
    trainer.train()

Each subclass adds ``target_dataset`` (prepared exactly like ``train_dataset`` and cycled by its own iterator: it runs
out first), ``target_batch_size`` (target samples per rank per step, default 1: the paper's setting), ``dr_method``
and ``dr_options`` (DataRegularizer options: ``frac``, ``scoring``, ``slack``, ``assembly``, ...). ``training_step`` is
overridden; the merged batch (general rows + target rows) runs through the *unwrapped* model with drpost's per-row
loss, under the accelerator's autocast when mixed precision is on (TRL's configs default to ``bf16=True``, also on
CPU; the backward then runs outside autocast, as the Trainer does it). Two ways to land the update:

  one pass (single process and plain DDP, the default): one captured forward/backward; the regularizer assembles the
          update from the captured factors and writes ``.grad`` itself (:meth:`DataRegularizer.step`; under DDP it
          all-reduces the result), scaled by the micro-step's share of the accumulation window (and by an fp16 grad
          scaler's scale, which the Trainer unscales before clipping) and added to any accumulated gradient. Used for every scope: layer
          scope (``layerwise_subset``, any set with ``scope="layer"``) has one coefficient vector per block, which no
          single weighted loss could express anyway.
  two passes (global scope under DeepSpeed or FSDP, or ``dr_options={"assembly": "two_pass"}``): pass 1 returns the
          row coefficients ``c_r`` from the captured backward without writing ``.grad``
          (:meth:`DataRegularizer.row_weights`); pass 2 runs the rows with ``c_r != 0`` through the *wrapped* model
          and ``accelerator.backward(sum_r c_r loss_r)``, so sharded gradients and the engine's own accumulation keep
          working. Layer scope cannot take this path, so it is refused under DeepSpeed and FSDP.
Both give the same update (tested in fp64 to 1e-6 relative, with accumulation and clipping). The share: where the
plain trainer divides each micro-step's summed loss by the whole window's loss tokens (SFT: transformers'
``num_items_in_batch``; GRPO ``loss_type="dapo"``: the generation batch's completion tokens), a micro-step holding n of
the window's N tokens weighs n / N, so the window's update is the plain trainer's token mean however the tokens fall
into micro-steps (a 1 / accumulation weight was 0.42 relative off plain SFT on uneven rows, tested); where it divides
a per-micro-step mean by the accumulation steps (DPO, GRPO ``grpo`` / ``bnpo``), 1 / accumulation steps. Under DDP
the step is one token mean over every rank's rows, which is the plain trainer's with transformers' default
``average_tokens_across_devices=True``; ``DrSFTTrainer`` refuses ``False`` there (each rank's own mean, averaged). Gradient clipping, the
optimizer, the scheduler and logging stay the Trainer's; the returned loss is the general rows' token-mean loss /
accumulation steps, as the plain trainer's.

Refused by name at construction (``NotImplementedError``), each because the plain trainer's loss is then not what
the adapter's per-sample step computes: an MoE router's load-balancing loss (TRL adds it by default for MoE models;
pass ``router_aux_loss_coef=0.0``), SFT ``loss_type="dft"``, ``label_smoothing_factor`` and ``compute_loss_func``,
DPO ``loss_weights`` other than ``[1.0]`` and loss types other than sigmoid, and the per-adapter options listed in
each class.

Cost: one pass = a forward + activation-only backward of the merged batch, plus scoring and one GEMM per weight use
for the assembly; two passes add an ordinary forward/backward of the kept rows (about 1.7-2x a plain step). Like
TRL's fused LM head, the LM head runs only from the batch's earliest label position on (``logits_to_keep``, where
the model takes it: same loss and update, tested). Step time against the plain TRL trainers: ``drpost bench trl``
(``drpost.bench.trl``); the figures below are ``results/system/trl/summary.md``, with the command that made them
(random Llama, hidden 256, 4 layers, vocab 8192, T=64, 8 general rows + 1 target sample; GRPO: 8 completions = 2
prompts x 4 generations, the target 1 prompt x 4; single process, one thread, CPU time per step on a 2-core CPU
without AVX512, nothing else running; median over rounds of the median step after the warm-up, after one untimed
run of each trainer). Adapter / plain TRL trainer, global_subset | layerwise_subset, fp32: SFT 0.79x | 0.72x, DPO
0.72x | 0.73x (2 rounds of 3 timed steps), GRPO 1.16x | 1.16x (3 rounds of 4; on cores shared with other jobs the
same command gave 1.15x | 1.18x, and the loose script it replaced 1.03x | 1.05x). TRL's default bf16 (``precision=bf16``,
``results/system/trl/bf16/summary.md``; emulated on that CPU, a plain step ~7x its fp32 time; 1 round): SFT 1.31x |
1.48x, DPO 1.31x | 1.26x. A subset step assembles weight gradients for the kept rows only, so it can be cheaper than
a plain step.
GRPO's target prompts join TRL's own generate call (module ``grpo``): one ``generate`` of 12 rows instead of the
plain step's 8 (cProfile: 0.49 s a step, against 0.90 s in two calls before), and 12 rows in the forward/backward
instead of 8, which is all that remains of its excess. In emulated bf16 every extra bf16 GEMM (scoring, assembly)
costs ~20x its fp32 price.

Supported features and limits (checked at construction, with a clear error):
  * SFT: padded batches of ``input_ids``/``attention_mask``/``labels``; not ``padding_free`` / packing.
  * DPO: ``loss_type=["sigmoid"]``, ``f_divergence_type="reverse_kl"``, no ``ld_alpha``, no ``use_weighting``; the
    reference log-probs come from TRL (precomputed columns or ``compute_ref_log_probs``). Sample = one pair.
  * GRPO: ``loss_type`` in ``grpo`` (sequence mean), ``bnpo``/``dapo`` (token mean); token-level importance
    sampling, ``beta`` KL (k3) supported; no vLLM importance-sampling correction, entropy bonus / masks, off-policy
    masks, ``delta``, tools or images. Sample = one completion (TRL shuffles a generation batch, so groups are not
    contiguous). Target prompts are generated in TRL's generate call for the general batch, one target batch per
    micro-step of the generation batch (``steps_per_generation``), then scored on their own by TRL's
    ``_generate_and_score_completions``: group-relative advantages over the target groups only (their reward and
    completion metrics are logged with the general ones). With ``num_iterations > 1`` a micro-step's target rows are
    reused with its general rows. Plain DDP is tested (2 gloo ranks, ``tests/integrations/test_trl_grpo_ddp.py``):
    each rank's target rows are whole groups of its own target prompts, and the update equals one process on the
    union of the ranks' rows, so the token mean is over all ranks' tokens: TRL's ``dapo`` (its default, also with
    accumulation); TRL's ``bnpo`` averages per-rank token means instead, so ``bnpo`` is refused under DDP.
  * DPO with ``precompute_ref_log_probs=True``: the target dataset gets its reference columns precomputed like the
    train dataset, from the model before training (or ``ref_model``); a batch without them is refused.
Metrics in the logs: TRL's own, computed on the general rows as the plain trainer computes them on its batch (SFT:
``entropy``, ``mean_token_accuracy``, ``num_tokens``; DPO: ``rewards/{chosen,rejected,accuracies,margins}``,
``logps/{chosen,rejected}``, ``logits/{chosen,rejected}``, ``entropy``, ``mean_token_accuracy``, ``num_tokens``,
taken from pass 1's logits, a few rows at a time; GRPO: TRL's generation and reward metrics), and drpost's
``dr/target_loss``, ``dr/kept_frac`` (fraction of general samples with nonzero weight), ``dr/skipped``.

Layout: ``common`` (the shared step: target cycling, one-pass / two-pass backward, mixed precision scaling, drpost's
and TRL's metrics), ``logits`` (wrappers around the model's forward: LM head on label positions only, the logit tap
for TRL's metrics), ``sft`` / ``dpo`` / ``grpo`` (one adapter each: batch conversion, loss, supported options).

Test: ``.venv/bin/pytest -q tests/integrations/test_trl.py tests/integrations/test_trl_bf16.py
tests/integrations/test_trl_grpo.py``.
"""

from __future__ import annotations

# common first: it checks the installed trl version before any adapter imports from trl
from drpost.integrations.trl.common import TRL_RANGE
from drpost.integrations.trl.dpo import DrDPOTrainer
from drpost.integrations.trl.grpo import DrGRPOTrainer
from drpost.integrations.trl.sft import DrSFTTrainer

__all__ = ["DrDPOTrainer", "DrGRPOTrainer", "DrSFTTrainer", "TRL_RANGE"]
