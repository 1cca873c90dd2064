"""``DrDPOTrainer``: TRL's ``DPOTrainer`` with the data-regularized step (one sample = one preference pair: chosen and
rejected rows interleaved, reference log-probs from TRL), its option checks and TRL's DPO metrics."""

from __future__ import annotations

import torch
from accelerate.utils import is_peft_model
from torch import Tensor
from trl import DPOTrainer

from drpost.integrations.trl.common import _DrMixin
from drpost.objectives import dpo_loss_fn


def _interleave(x: Tensor) -> Tensor:
    """(2P, ...) as [chosen rows; rejected rows] -> (2P, ...) alternating chosen/rejected."""
    P = x.shape[0] // 2
    return torch.stack([x[:P], x[P:]], 1).reshape(2 * P, *x.shape[1:])


class DrDPOTrainer(_DrMixin, DPOTrainer):
    """``DPOTrainer`` with a data-regularized step; one sample = one preference pair."""

    def __init__(self, *args, target_dataset=None, dr_method: str = "layerwise_subset", dr_options: dict | None = None,
                 target_batch_size: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        bad = []
        if list(self.loss_types) != ["sigmoid"]:
            bad.append(f"loss_type={self.loss_types} (only ['sigmoid'])")
        if [float(w) for w in self.loss_weights] != [1.0]:
            bad.append(f"loss_weights={list(self.loss_weights)} (the sigmoid loss at weight 1 only)")
        if self.f_divergence_type != "reverse_kl":
            bad.append(f"f_divergence_type={self.f_divergence_type!r}")
        if self.ld_alpha is not None:
            bad.append("ld_alpha")
        if self.use_weighting:
            bad.append("use_weighting")
        if getattr(self, "_is_vision_dataset", False):
            bad.append("vision datasets")
        self._dr_refuse("DrDPOTrainer", bad)
        self._dr_init(target_dataset, dr_method, dr_options, target_batch_size)
        self.target_dataset = self._prepare_dataset(target_dataset, self.processing_class, self.args, "target")
        if self.precompute_ref_logps:  # the target pairs need reference log-probs too, taken before training
            bs = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
            self.target_dataset = self._precompute_ref_logps(self.target_dataset, "target", bs)

    def _dr_rows(self, inputs, model, target: bool) -> dict:
        dev = self.accelerator.device
        inputs = {k: (v.to(dev) if isinstance(v, Tensor) else v) for k, v in inputs.items()}
        ids, cm = inputs["input_ids"], inputs["completion_mask"]
        if "ref_chosen_logps" in inputs and "ref_rejected_logps" in inputs:
            ref_c, ref_r = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        elif self.ref_model is None and self.precompute_ref_logps and not is_peft_model(self.model):
            raise RuntimeError(  # the policy is no longer the reference: refuse rather than train a wrong direction
                f"DrDPOTrainer: a {'target' if target else 'general'} batch has no 'ref_chosen_logps' / "
                "'ref_rejected_logps' although precompute_ref_log_probs=True and there is no ref_model")
        else:
            ref_model = self.ref_model if self.ref_model is not None else self.model
            ref_c, ref_r = self.compute_ref_log_probs(ref_model, inputs)
        P = ids.shape[0] // 2
        return {
            "input_ids": _interleave(ids),
            "attention_mask": _interleave(inputs["attention_mask"]),
            "labels": _interleave(ids.masked_fill(cm == 0, -100)),
            "ref_logps": torch.stack([ref_c, ref_r], 1).reshape(-1).detach(),
            "sample_index": torch.arange(P, device=dev).repeat_interleave(2),
        }

    def _dr_loss_fn(self):
        return dpo_loss_fn(beta=self.beta)

    def _dr_wants_stats(self) -> bool:
        return True

    def _dr_log_trl_metrics(self, stats: dict, general: dict) -> None:
        """DPOTrainer's ``rewards/*``, ``logps/*``, ``logits/*``, ``entropy``, ``mean_token_accuracy`` and
        ``num_tokens``, on the general pairs (rows alternate chosen / rejected)."""
        m = self._metrics["train"]
        gather = self.accelerator.gather_for_metrics
        logp = stats["logp"]  # (2P,) summed completion log-probs
        rewards = self.beta * (logp - general["ref_logps"].to(logp.dtype))  # (2P,)
        rc, rr = gather(rewards[0::2]), gather(rewards[1::2])
        m["rewards/chosen"].append(rc.mean().item())
        m["rewards/rejected"].append(rr.mean().item())
        m["rewards/accuracies"].append((rc > rr).float().mean().item())
        m["rewards/margins"].append((rc - rr).mean().item())
        m["logps/chosen"].append(gather(logp[0::2]).mean().item())
        m["logps/rejected"].append(gather(logp[1::2]).mean().item())
        m["entropy"].append(self._dr_token_means(stats, ("entropy",))["entropy"])
        for side, sl in (("chosen", slice(0, None, 2)), ("rejected", slice(1, None, 2))):
            m[f"logits/{side}"].append(self._dr_token_means(stats, ("logits",), sl)["logits"])
        m["mean_token_accuracy"].append(self._dr_token_means(stats, ("correct",), slice(0, None, 2))["correct"])
        self._dr_count_tokens(general)
