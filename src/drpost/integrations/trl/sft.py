"""``DrSFTTrainer``: TRL's ``SFTTrainer`` with the data-regularized step (padded ``input_ids`` / ``attention_mask`` /
``labels`` rows, drpost's causal LM loss), plus the guided sampler and the DSIR / LESS prefilters for the general
data."""

from __future__ import annotations

import torch
from torch import Tensor
from trl import SFTTrainer

from drpost.integrations.trl.common import _DrMixin
from drpost.objectives import causal_lm_loss


class DrSFTTrainer(_DrMixin, SFTTrainer):
    """``SFTTrainer`` with a data-regularized step (see the ``drpost.integrations.trl`` docstring)."""

    def __init__(self, *args, target_dataset=None, dr_method: str = "layerwise_subset", dr_options: dict | None = None,
                 target_batch_size: int = 1, dr_sampler: str | dict | None = None, dr_prefilter: str | None = None,
                 dr_prefilter_frac: float = 0.1, **kwargs):
        """``dr_sampler``: the general pool's distribution (``drpost.trainers.samplers.Guidance``: None or
        ``"uniform"`` = the Trainer's own sampler; ``"guided"`` or a dict of options = score-guided draws on hashed
        token n-grams, single process). ``dr_prefilter``: keep ``dr_prefilter_frac`` of ``train_dataset`` before
        training: ``"dsir"`` = DSIR-resampled (decoded rows vs decoded target rows), ``"less"`` = the top LESS scores
        of the model's base weights on the tokenized rows (``drpost.baselines.less``; single process)."""
        super().__init__(*args, **kwargs)
        if self.padding_free or self.args.packing:
            raise ValueError("DrSFTTrainer needs one sequence per row: set padding_free=False and packing=False")
        bad = []  # options that change the plain trainer's loss, which drpost's token-mean NLL step would ignore
        if self.args.loss_type != "nll":
            bad.append(f"loss_type={self.args.loss_type!r} (nll only)")
        if self.args.label_smoothing_factor > 0:
            bad.append("label_smoothing_factor")
        if self.compute_loss_func is not None:
            bad.append("compute_loss_func")
        if self.args.world_size > 1 and not self.args.average_tokens_across_devices:
            # the plain trainer then averages each rank's own token mean; drpost's step is one token mean over the
            # rows of every rank, and no per-micro-step weight turns one into the other
            bad.append("average_tokens_across_devices=False with more than one process")
        self._dr_refuse("DrSFTTrainer", bad)
        self._dr_init(target_dataset, dr_method, dr_options, target_batch_size)
        if not getattr(self, "_skip_prepare_dataset", False):
            target_dataset = self._prepare_dataset(target_dataset, self.processing_class, self.args, False,
                                                   self._formatting_func, "target")
        self.target_dataset = target_dataset
        from drpost.trainers.samplers import setup_trl_sampler

        setup_trl_sampler(self, dr_sampler, dr_prefilter, dr_prefilter_frac)

    def _get_train_sampler(self, train_dataset=None):
        """The guided sampler for the general data (the Trainer hands a column-pruned copy of train_dataset); the
        Trainer's own for the target loader."""
        if getattr(self, "dr_sampler", None) is not None and not getattr(self, "_dr_in_target", False):
            return self.dr_sampler
        return super()._get_train_sampler(train_dataset)

    def _dr_target_loader(self):
        self._dr_in_target = True
        try:
            return super()._dr_target_loader()
        finally:
            self._dr_in_target = False

    def _dr_backward(self, model, general: dict, target: dict, window_items=None) -> Tensor:
        loss = super()._dr_backward(model, general, target, window_items)
        if getattr(self, "dr_sampler", None) is not None:
            self.dr_sampler.feedback(self.dr_last_report)
        return loss

    def _dr_rows(self, inputs, model, target: bool) -> dict:
        dev = self.accelerator.device
        ids = inputs["input_ids"].to(dev)
        attn = inputs.get("attention_mask")
        return {"input_ids": ids, "attention_mask": (torch.ones_like(ids) if attn is None else attn.to(dev)),
                "labels": inputs["labels"].to(dev)}

    def _dr_loss_fn(self):
        return causal_lm_loss

    def _dr_wants_stats(self) -> bool:
        return True

    def _dr_log_trl_metrics(self, stats: dict, general: dict) -> None:
        """SFTTrainer's ``entropy``, ``mean_token_accuracy`` and ``num_tokens``, on the general rows."""
        m = self._metrics["train"]
        mean = self._dr_token_means(stats, ("entropy", "correct"))
        m["entropy"].append(mean["entropy"])
        m["mean_token_accuracy"].append(mean["correct"])
        self._dr_count_tokens(general)
