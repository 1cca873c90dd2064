"""``DrGRPOTrainer``: TRL's ``GRPOTrainer`` with the data-regularized step (one sample = one completion), its option
checks and the tempered GRPO loss.

Target rows at (almost) no generation cost: whenever TRL generates its generation batch (``_prepare_inputs``, once
every ``steps_per_generation * num_iterations`` micro-steps), the target prompts of the next ``steps_per_generation``
micro-steps (``target_batch_size`` prompts each, each repeated ``num_generations`` times) are appended to the prompts
of TRL's own generate call (``_generate_single_turn``) and split off its output, so one ``generate`` serves both.
The target rows are then scored by TRL's own ``_generate_and_score_completions`` on their own (the generate call
inside it is served the stored completions): rewards, group-relative advantages over the target groups only (the
general groups never see a target row, and vice versa), old / reference log-probs where TRL computes them, and TRL's
reward metrics. The general rows go on through TRL's normal path (shuffle, split, buffer); each micro-step takes its
own slice of the buffered target rows, like the general ones (reused with them when ``num_iterations > 1``). Where
the prompts cannot share a call (a ``rollout_func``, images, or vLLM with groups spanning ranks), the
target rows are generated in a separate call, as before."""

from __future__ import annotations

import copy

import torch
from trl import GRPOTrainer
from trl.trainer.utils import split_tensor_dict

from drpost.integrations.trl.common import _DrMixin
from drpost.objectives import grpo_loss_fn


class _Tempered(torch.nn.Module):
    """Calls ``model`` and divides its logits by the sampling temperature (as TRL's GRPO loss does)."""

    def __init__(self, model, temperature: float):
        super().__init__()
        self.inner = model
        self.temperature = temperature

    def forward(self, **kw):
        out = self.inner(**kw)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return (logits / self.temperature,)


class DrGRPOTrainer(_DrMixin, GRPOTrainer):
    """``GRPOTrainer`` with a data-regularized step; one sample = one completion. ``target_dataset`` holds prompts
    (with the columns the reward functions read); ``target_batch_size`` target prompts per rank per step, each
    sampled ``num_generations`` times."""

    def __init__(self, *args, target_dataset=None, dr_method: str = "layerwise_subset", dr_options: dict | None = None,
                 target_batch_size: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        bad = []
        if self.loss_type not in ("grpo", "bnpo", "dapo"):
            bad.append(f"loss_type={self.loss_type!r} (grpo, bnpo, dapo only)")
        if self.loss_type == "bnpo" and a.world_size > 1:
            # TRL's bnpo averages each rank's own token mean; drpost's step is one token mean over every rank's rows
            # (TRL's dapo, the default, which the adapter reproduces)
            bad.append("loss_type='bnpo' with more than one process (use 'dapo': the token mean over every rank)")
        if self.importance_sampling_level != "token":
            bad.append("importance_sampling_level != 'token'")
        if self.top_entropy_quantile < 1.0 or self._entropy_bonus_enabled:
            bad.append("entropy masks / bonus")
        if self.off_policy_mask_threshold is not None or getattr(a, "delta", None) is not None:
            bad.append("off-policy masks / delta")
        if self.use_vllm and getattr(self, "vllm_importance_sampling_correction", False):
            bad.append("vLLM importance-sampling correction")
        if getattr(self, "tools", None) or getattr(self, "environment_factories", None) is not None:
            bad.append("tools / environments")
        self._dr_refuse("DrGRPOTrainer", bad)
        self._dr_init(target_dataset, dr_method, dr_options, target_batch_size)
        self.target_dataset = target_dataset
        self._dr_pending = None  # raw target rows waiting to join TRL's next generate call
        self._dr_served = None  # (prompt ids, completion ids, logprobs) of target rows generated with the general ones
        self._dr_targets = None  # scored target rows, one dict per micro-step of the current generation batch

    def training_step(self, model, inputs, num_items_in_batch=None):
        out = _DrMixin.training_step(self, model, inputs, num_items_in_batch)
        self._step += 1  # GRPOTrainer's own step counter (drives the generation buffer)
        return out

    def _dr_window_items(self, inputs, num_items_in_batch):
        """``dapo`` divides each micro-step's summed loss by the generation batch's completion tokens (every rank's),
        rescaled to one accumulation window (x accumulation steps / steps_per_generation), as TRL does; ``grpo`` and
        ``bnpo`` divide a per-micro-step mean by the accumulation steps (None)."""
        if self.loss_type != "dapo" or inputs.get("num_items_in_batch") is None:
            return None
        return float(inputs["num_items_in_batch"]) * self.current_gradient_accumulation_steps \
            / self.args.steps_per_generation

    # ------------------------------------------------------------------ target rows generated with the general ones
    def _prepare_inputs(self, generation_batch):
        """TRL's ``_prepare_inputs``; in training, each time it generates, the next ``steps_per_generation`` target
        batches join its generate call and are then scored on their own into ``_dr_targets``."""
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        spg = self.args.steps_per_generation
        if not (self._step % (spg * self.num_iterations) == 0 or self._buffered_inputs is None
                or self._dr_targets is None):
            return super()._prepare_inputs(generation_batch)
        raw = [x for _ in range(spg) for x in _DrMixin._dr_next_target(self)]
        self._dr_pending, self._dr_served = raw, None
        try:
            inputs = super()._prepare_inputs(generation_batch)  # consumes _dr_pending where the call can be shared
            self._dr_pending = None  # not shared (e.g. a rollout_func): the call below generates the target rows
            # the generate call inside is served the stored completions (or, if nothing was stored, generates)
            scored = self._generate_and_score_completions(raw)
        finally:
            self._dr_pending = self._dr_served = None
        self._dr_targets = split_tensor_dict(scored, spg)  # contiguous slices of whole groups, one per micro-step
        return inputs

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """TRL's generate call, with the pending target prompts appended (their completions are stored for the
        target's scoring call, which this then serves instead of generating)."""
        served = self._dr_served
        if served is not None:
            self._dr_served = None
            t_ids, completion_ids, logprobs = served
            if [list(x) for x in prompt_ids] != t_ids:  # pragma: no cover - internal consistency guard
                raise RuntimeError("DrGRPOTrainer: stored target completions do not match the target prompts")
            return completion_ids, logprobs
        pending = self._dr_pending
        if not pending or not self._dr_can_share(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        self._dr_pending = None
        t_ids = [list(x) for x in self._tokenize_prompts(copy.deepcopy([x["prompt"] for x in pending]))[0]]
        n = len(prompt_ids)
        completion_ids, logprobs = super()._generate_single_turn(list(prompt_ids) + t_ids, images, multimodal_fields,
                                                                 num_generations, has_tool_images)
        self._dr_served = (t_ids, completion_ids[n:], None if logprobs is None else logprobs[n:])
        return completion_ids[:n], None if logprobs is None else logprobs[:n]

    def _dr_can_share(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images) -> bool:
        """Whether the target prompts can join this generate call: text only, and under vLLM each rank's general
        rows must be whole groups (server mode generates for every ``num_generations``-th gathered prompt)."""
        if images is not None or multimodal_fields or has_tool_images:
            return False
        return not (self.use_vllm and len(prompt_ids) % num_generations)

    def _dr_next_target(self):
        """This micro-step's scored target rows (from the current generation batch)."""
        return self._dr_targets[self._step % self.args.steps_per_generation]

    def _dr_target_loader(self):
        """This rank's raw target batches: its share of the target prompts, reshuffled every pass, each repeated
        num_generations times (drawn by ``_prepare_inputs``, ``steps_per_generation`` batches at a time)."""
        n = len(self.target_dataset)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        epoch = getattr(self, "_dr_epoch", 0)
        self._dr_epoch = epoch + 1
        g = torch.Generator().manual_seed(self.args.seed + epoch)
        order = torch.randperm(n, generator=g).tolist()
        order = [order[i % n] for i in range(rank, max(n, world), world)]  # every rank gets at least one
        k = self.target_batch_size
        for i in range(0, len(order) - k + 1 if len(order) >= k else 1, k):
            chunk = [order[j % len(order)] for j in range(i, i + k)]
            yield [self.target_dataset[j] for j in chunk for _ in range(self.num_generations)]

    def _dr_rows(self, inputs, model, target: bool) -> dict:
        """A scored TRL batch (general: from ``_prepare_inputs``; target: from ``_dr_next_target``) -> row batch."""
        p_ids, p_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        c_ids, c_mask = inputs["completion_ids"], inputs["completion_mask"]
        ids = torch.cat([p_ids, c_ids], 1)
        attn = torch.cat([p_mask, c_mask], 1)
        P = p_ids.shape[1]
        labels = ids.masked_fill(torch.ones_like(ids, dtype=torch.bool), -100)
        labels[:, P:] = c_ids.masked_fill(c_mask == 0, -100)
        out = {"input_ids": ids, "attention_mask": attn, "labels": labels, "advantages": inputs["advantages"]}

        def aligned(x):  # (B, C) completion logps -> token-aligned (B, P + C)
            return torch.cat([x.new_zeros(x.shape[0], P), x], 1).detach()

        if inputs.get("old_per_token_logps") is not None:
            out["old_logps"] = aligned(inputs["old_per_token_logps"])
        if inputs.get("ref_per_token_logps") is not None:
            out["ref_logps"] = aligned(inputs["ref_per_token_logps"])
        return out

    def _dr_loss_fn(self):
        agg = "seq_mean" if self.loss_type == "grpo" else "token_mean"
        inner = grpo_loss_fn(clip_range=self.epsilon_low, clip_range_high=self.epsilon_high, kl_coef=self.beta,
                             loss_agg=agg)
        temp = float(self.temperature)
        if temp == 1.0:
            return inner
        return lambda model, batch: inner(_Tempered(model, temp), batch)
