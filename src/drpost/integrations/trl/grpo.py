"""``DrGRPOTrainer``: TRL's ``GRPOTrainer`` with the data-regularized step (one sample = one completion; target
prompts generated and scored by TRL, each ``num_generations`` times), its option checks and the tempered GRPO loss."""

from __future__ import annotations

import torch
from trl import GRPOTrainer

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

    def training_step(self, model, inputs, num_items_in_batch=None):
        out = _DrMixin.training_step(self, model, inputs, num_items_in_batch)
        self._step += 1  # GRPOTrainer's own step counter (drives the generation buffer)
        return out

    def _dr_target_loader(self):
        """This rank's share of the target prompts, reshuffled every pass, each repeated num_generations times."""
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
        if target:
            inputs = self._generate_and_score_completions(inputs)
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
