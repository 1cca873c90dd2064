"""What the three TRL adapters share: the trl version check (``TRL_RANGE``) and ``_DrMixin``, the regularized
``training_step`` (target batches cycled from the trainer's own dataloader, the one-pass and two-pass backward with
gradient accumulation, the fp16 grad scaler's scale and DeepSpeed / FSDP handling) and the metrics it logs
(drpost's ``dr/*`` and the helpers for TRL's own). Usage and the two paths: the package docstring."""

from __future__ import annotations

import torch
import trl
from accelerate.utils import DistributedType
from packaging.version import Version
from torch import Tensor

from drpost.integrations.trl.logits import _label_positions_only, _tapped
from drpost.objectives.sft import accepts_logits_to_keep
from drpost.step import DataRegularizer, merge_batches, take_rows

TRL_RANGE = (">=1.0", "<2")
if not (Version("1.0") <= Version(trl.__version__) < Version("2")):  # pragma: no cover - version guard
    raise ImportError(f"drpost.integrations.trl supports trl{TRL_RANGE[0]},{TRL_RANGE[1]}; found {trl.__version__}")


def _cycle(make_iter):
    """Endless iterator that restarts ``make_iter()`` whenever it is exhausted."""
    while True:
        empty = True
        for x in make_iter():
            empty = False
            yield x
        if empty:
            raise ValueError("option 'target_dataset' is empty")


class _DrMixin:
    """Shared regularized training step; subclasses convert TRL batches to drpost row batches."""

    def _dr_refuse(self, trainer: str, bad: list[str]) -> None:
        """Construction check: raise ``NotImplementedError`` naming the unsupported options in ``bad``, and those
        every adapter refuses, if any. Every adapter: a Mixture-of-Experts router's load-balancing loss, which the
        TRL trainers add by default for MoE models (``router_aux_loss_coef`` from the model's config) and which is
        not a sum over samples (its expert loads are counted over the whole batch), so drpost's per-sample step
        cannot carry it."""
        if getattr(self, "aux_loss_enabled", False):
            bad = [*bad, f"the MoE router's auxiliary loss (router_aux_loss_coef={self.router_aux_loss_coef}; pass "
                         "router_aux_loss_coef=0.0 in the trainer's config to train without it)"]
        if bad:
            raise NotImplementedError(f"{trainer} does not support: " + ", ".join(bad))

    def _dr_init(self, target_dataset, dr_method: str, dr_options: dict | None, target_batch_size: int):
        if target_dataset is None:
            raise ValueError("option 'target_dataset' is required (the few examples of the task you care about)")
        if not (isinstance(target_batch_size, int) and target_batch_size >= 1):
            raise ValueError(f"option 'target_batch_size' must be a positive integer, got {target_batch_size!r}")
        self.dr_method = dr_method
        self.dr_options = dict(dr_options or {})
        self.target_batch_size = target_batch_size
        self.dr_last_report = None
        self._dr_target_iter = None
        # built on the unwrapped model now (bad options fail here); DDP / accelerate keep the same parameters
        self.regularizer = DataRegularizer(self.model, method=dr_method, **self.dr_options)

    # ------------------------------------------------------------------ subclass hooks
    def _dr_target_loader(self):
        """This rank's target batches: the trainer's own dataloader machinery on the target dataset (built once)."""
        if getattr(self, "_dr_loader", None) is None:
            self._dr_loader = self._get_dataloader(self.target_dataset, "Target", self.target_batch_size,
                                                   sampler_fn=self._get_train_sampler, is_training=True)
        return iter(self._dr_loader)

    def _dr_rows(self, inputs, model, target: bool) -> dict:  # TRL batch -> drpost row batch
        raise NotImplementedError

    def _dr_loss_fn(self):
        raise NotImplementedError

    # ------------------------------------------------------------------ the step
    def _dr_get_regularizer(self, model) -> DataRegularizer:
        if self.regularizer.model is not self.accelerator.unwrap_model(model):  # e.g. a model swapped after init
            self.regularizer = DataRegularizer(self.accelerator.unwrap_model(model), method=self.dr_method,
                                               **self.dr_options)
        return self.regularizer

    def _dr_next_target(self):
        if self._dr_target_iter is None:
            self._dr_target_iter = _cycle(self._dr_target_loader)
        return next(self._dr_target_iter)

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        general = self._dr_rows(inputs, model, target=False)
        target = self._dr_rows(self._dr_next_target(), model, target=True)
        return self._dr_backward(model, general, target, self._dr_window_items(inputs, num_items_in_batch))

    def _dr_window_items(self, inputs, num_items_in_batch):
        """The loss tokens of the whole accumulation window by which the plain trainer divides each micro-step's
        summed loss (transformers' ``num_items_in_batch``: every micro-step of the window, and every rank with
        ``average_tokens_across_devices``), or None where it divides a per-micro-step mean by the accumulation
        steps instead."""
        return num_items_in_batch

    def _dr_divisor(self, general: dict, window_items, ga: int) -> float:
        """What this micro-step's step is divided by before it joins the accumulated ``.grad``: the accumulation
        steps without a window count; ``N / n`` for a micro-step holding n of the window's N loss tokens (the
        regularizer's step is a token mean over its own micro-batch, and over every rank's rows under DDP), so the
        window's update is the plain trainer's token mean however the tokens fall into micro-steps (inf: no tokens)."""
        if window_items is None or float(window_items) <= 0:
            return ga
        n = (general["labels"][..., 1:] != -100).sum()
        if self.accelerator.num_processes > 1 and getattr(self.args, "average_tokens_across_devices", True):
            n = self.accelerator.reduce(n.to(self.accelerator.device), reduction="sum")
        return float(window_items) / float(n) if float(n) > 0 else float("inf")

    def _dr_head(self, loss_fn, reg):
        """``loss_fn`` with the LM head on label positions only, where the model takes ``logits_to_keep``."""
        if getattr(self, "_dr_keep_ok", None) is None:
            self._dr_keep_ok = accepts_logits_to_keep(reg.model)
        return _label_positions_only(loss_fn) if self._dr_keep_ok else loss_fn

    def _dr_two_pass(self, reg) -> bool:
        """True when a global-scope step must run pass 2 through the accelerator (DeepSpeed, FSDP, or asked for)."""
        sharded = self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        if reg.feasible.scope != "global":
            if sharded:
                raise NotImplementedError(
                    f"layer-scope methods ({self.dr_method!r}) write .grad directly and cannot run under "
                    f"{self.accelerator.distributed_type}; use a global-scope method (global_subset, hull, ...) or "
                    "plain DDP")
            return False
        return sharded or reg.assembly == "two_pass"

    def _dr_backward(self, model, general: dict, target: dict, window_items=None) -> Tensor:
        """Regularized backward of one micro-batch, divided by its share of the accumulation window
        (``_dr_divisor``); returns the general token-mean loss / accumulation steps."""
        reg = self._dr_get_regularizer(model)
        stats: dict = {}
        loss_fn = self._dr_loss_fn()
        if self._dr_wants_stats():  # TRL's own metrics, from the general rows of pass 1's forward
            loss_fn = _tapped(loss_fn, general["input_ids"].shape[0], stats)
        loss_fn = self._dr_head(loss_fn, reg)
        ga = self.current_gradient_accumulation_steps
        div = self._dr_divisor(general, window_items, ga)
        lr = float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else None
        if self._dr_two_pass(reg):
            rep = self._dr_backward_two_pass(model, reg, general, target, loss_fn, lr, div)
        else:
            rep = self._dr_backward_one_pass(reg, general, target, loss_fn, lr, div)
        self.dr_last_report = rep
        self._dr_log(rep)
        if stats:
            self._dr_log_trl_metrics(stats, general)
        return torch.tensor(rep.loss / ga if rep.loss == rep.loss else 0.0, device=self.accelerator.device)

    def _dr_backward_one_pass(self, reg, general, target, loss_fn, lr, ga):
        """One captured forward/backward of the merged batch; the regularizer assembles ``.grad`` from the captured
        factors (all-reduced by drpost itself under DDP). Scaled by 1 / accumulation steps (and by the loss scale of
        an fp16 grad scaler, which the Trainer unscales before clipping), added to any accumulated ``.grad``."""
        params = [p for p in reg.model.parameters() if p.requires_grad]
        stash = {p: p.grad for p in params}
        for p in params:
            p.grad = None
        scale = 1.0 / ga
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale *= float(scaler.get_scale())
        try:
            with self.compute_loss_context_manager():
                rep = reg.step(general, target, loss_fn, lr=lr)
        finally:
            for p in params:
                g, old = p.grad, stash[p]
                if g is not None and scale != 1.0:
                    g.mul_(scale)
                p.grad = old if g is None else (g if old is None else old.add_(g))
        return rep

    def _dr_backward_two_pass(self, model, reg, general, target, loss_fn, lr, ga):
        """Pass 1: row coefficients from one captured backward (no ``.grad``); pass 2: the kept rows through the
        *wrapped* model and ``accelerator.backward(sum_r c_r loss_r)`` (what DeepSpeed / FSDP need)."""
        device = self.accelerator.device
        dtype = self.accelerator.distributed_type
        with self.compute_loss_context_manager():
            c, rep = reg.row_weights(general, target, loss_fn, lr=lr)
        if c is None:
            return rep
        merged = merge_batches(general, target, device)
        if "sample_index" in general:  # row -> sample grouping is kept (DPO pairs stay whole)
            merged["sample_index"] = torch.cat([torch.as_tensor(general["sample_index"], device=device),
                                                torch.as_tensor(target["sample_index"], device=device)
                                                + int(general["sample_index"].max()) + 1])
        keep = torch.nonzero(c != 0).flatten()
        if keep.numel() == 0:  # still one (zero-weight) backward: DDP ranks must all reduce
            keep = torch.zeros(1, dtype=torch.long, device=c.device)
        with self.compute_loss_context_manager():
            loss_sums, _ = self._dr_head(self._dr_loss_fn(), reg)(model, take_rows(merged, keep))
        # coefficients are globally normalized; DDP averages over ranks, so undo that average
        world = rep.info.get("world_size", 1)
        acc_div = 1 if dtype == DistributedType.DEEPSPEED else self.accelerator.gradient_accumulation_steps
        loss = (loss_sums * c[keep].to(loss_sums.dtype)).sum() * (world * acc_div / ga)
        kwargs = {"scale_wrt_gas": False} if dtype == DistributedType.DEEPSPEED else {}
        self.accelerator.backward(loss, **kwargs)
        return rep

    def _dr_log(self, rep) -> None:
        metrics = getattr(self, "_metrics", None)
        if metrics is None:
            return
        m = metrics["train"]
        if rep.skipped:
            m["dr/skipped"].append(1.0)
        if rep.weights is None:
            return
        m["dr/target_loss"].append(float(rep.target_loss))
        m["dr/kept_frac"].append(float((rep.weights != 0).float().mean()))

    def _dr_wants_stats(self) -> bool:
        """Whether the step taps the general rows' logits for TRL's own metrics (SFT, DPO)."""
        return False

    def _dr_log_trl_metrics(self, stats: dict, general: dict) -> None:
        raise NotImplementedError

    def _dr_count_tokens(self, general: dict) -> None:
        """TRL's ``num_tokens``: running total of the general rows' attended tokens over all ranks."""
        n = self.accelerator.gather_for_metrics(general["attention_mask"].sum()).sum().item()
        self._total_train_tokens += n // getattr(self, "_tp_size", 1)
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

    def _dr_total(self, x: Tensor) -> float:
        """Sum of ``x`` over this rank and every other (TRL gathers its metric counts the same way)."""
        return float(self.accelerator.gather_for_metrics(x.detach().sum()).sum())

    def _dr_token_means(self, stats: dict, keys: tuple[str, ...], rows: slice = slice(None)) -> dict[str, float]:
        """Per-token means over all ranks of the tapped per-row sums ``stats[key][rows]`` (0.0 where no token counts):
        the tokens counted first, then each key, in this order on every rank."""
        valid = self._dr_total(stats["valid"][rows])
        return {k: self._dr_total(stats[k][rows]) / valid if valid > 0 else 0.0 for k in keys}
