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
          all-reduces the result), scaled by 1 / gradient-accumulation steps (and by an fp16 grad scaler's scale, which
          the Trainer unscales before clipping) and added to any accumulated gradient. Used for every scope: layer
          scope (``layerwise_subset``, any set with ``scope="layer"``) has one coefficient vector per block, which no
          single weighted loss could express anyway.
  two passes (global scope under DeepSpeed or FSDP, or ``dr_options={"assembly": "two_pass"}``): pass 1 returns the
          row coefficients ``c_r`` from the captured backward without writing ``.grad``
          (:meth:`DataRegularizer.row_weights`); pass 2 runs the rows with ``c_r != 0`` through the *wrapped* model
          and ``accelerator.backward(sum_r c_r loss_r)``, so sharded gradients and the engine's own accumulation keep
          working. Layer scope cannot take this path, so it is refused under DeepSpeed and FSDP.
Both give the same update (tested in fp64 to 1e-6 relative, with accumulation and clipping). Gradient clipping, the
optimizer, the scheduler and logging stay the Trainer's; the returned loss is the general rows' token-mean loss /
accumulation steps, as the plain trainer's.

Cost: one pass = a forward + activation-only backward of the merged batch, plus scoring and one GEMM per weight use
for the assembly; two passes add an ordinary forward/backward of the kept rows (about 1.7-2x a plain step). Like
TRL's fused LM head, the LM head runs only from the batch's earliest label position on (``logits_to_keep``, where
the model takes it: same loss and update, tested). ``scripts/bench_trl_adapters.py`` (random Llama, hidden 256,
4 layers, vocab 8192, T=64, 8 general rows + 1 target, single process, one thread, CPU time per step, median of
3 steps; a 2-core CPU without AVX512), adapter / plain TRL trainer, global_subset | layerwise_subset:
fp32 (2 rounds): SFT 0.75x | 0.78x, DPO 0.78x | 0.81x, GRPO 1.56x | 1.58x; TRL's default bf16 (emulated on that CPU,
1 round): SFT 1.32x | 1.34x, DPO 1.33x | 1.35x. A subset step assembles weight gradients for the kept rows only, so
it can be cheaper than a plain step. GRPO's excess is mostly the target prompt's own generation call (about 0.4 s of
1.6 s per step in an earlier run) and its 4 completions joining the step (12 rows for the plain step's 8), not a
second pass. In emulated bf16 every extra bf16 GEMM (scoring, assembly) costs ~20x its fp32 price.

Supported features and limits (checked at construction, with a clear error):
  * SFT: padded batches of ``input_ids``/``attention_mask``/``labels``; not ``padding_free`` / packing.
  * DPO: ``loss_type=["sigmoid"]``, ``f_divergence_type="reverse_kl"``, no ``ld_alpha``, no ``use_weighting``; the
    reference log-probs come from TRL (precomputed columns or ``compute_ref_log_probs``). Sample = one pair.
  * GRPO: ``loss_type`` in ``grpo`` (sequence mean), ``bnpo``/``dapo`` (token mean); token-level importance
    sampling, ``beta`` KL (k3) supported; no vLLM importance-sampling correction, entropy bonus / masks, off-policy
    masks, ``delta``, tools or images. Sample = one completion (TRL shuffles a generation batch, so groups are not
    contiguous). Target prompts are generated and scored by TRL's own ``_generate_and_score_completions`` (their
    reward metrics are logged with the general ones).
  * DPO with ``precompute_ref_log_probs=True``: the target dataset gets its reference columns precomputed like the
    train dataset, from the model before training (or ``ref_model``); a batch without them is refused.
Metrics in the logs: TRL's own, computed on the general rows as the plain trainer computes them on its batch (SFT:
``entropy``, ``mean_token_accuracy``, ``num_tokens``; DPO: ``rewards/{chosen,rejected,accuracies,margins}``,
``logps/{chosen,rejected}``, ``logits/{chosen,rejected}``, ``entropy``, ``mean_token_accuracy``, ``num_tokens``,
taken from pass 1's logits, a few rows at a time; GRPO: TRL's generation and reward metrics), and drpost's
``dr/target_loss``, ``dr/kept_frac`` (fraction of general samples with nonzero weight), ``dr/skipped``.

Test: ``.venv/bin/pytest -q tests/integrations/test_trl.py tests/integrations/test_trl_bf16.py``.
"""

from __future__ import annotations

import inspect

import torch
import trl
from accelerate.utils import is_peft_model
from packaging.version import Version
from torch import Tensor

from drpost.objectives import causal_lm_loss, dpo_loss_fn, grpo_loss_fn
from drpost.step import DataRegularizer, merge_batches, take_rows

TRL_RANGE = (">=1.0", "<2")
if not (Version("1.0") <= Version(trl.__version__) < Version("2")):  # pragma: no cover - version guard
    raise ImportError(f"drpost.integrations.trl supports trl{TRL_RANGE[0]},{TRL_RANGE[1]}; found {trl.__version__}")

from trl import DPOTrainer, GRPOTrainer, SFTTrainer  # noqa: E402

__all__ = ["DrDPOTrainer", "DrGRPOTrainer", "DrSFTTrainer", "TRL_RANGE"]


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
        return self._dr_backward(model, general, target)

    def _dr_head(self, loss_fn, reg):
        """``loss_fn`` with the LM head on label positions only, where the model takes ``logits_to_keep``."""
        if getattr(self, "_dr_keep_ok", None) is None:
            self._dr_keep_ok = _accepts_logits_to_keep(reg.model)
        return _label_positions_only(loss_fn) if self._dr_keep_ok else loss_fn

    def _dr_two_pass(self, reg) -> bool:
        """True when a global-scope step must run pass 2 through the accelerator (DeepSpeed, FSDP, or asked for)."""
        from accelerate.utils import DistributedType

        sharded = self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        if reg.feasible.scope != "global":
            if sharded:
                raise NotImplementedError(
                    f"layer-scope methods ({self.dr_method!r}) write .grad directly and cannot run under "
                    f"{self.accelerator.distributed_type}; use a global-scope method (global_subset, hull, ...) or "
                    "plain DDP")
            return False
        return sharded or reg.assembly == "two_pass"

    def _dr_backward(self, model, general: dict, target: dict) -> Tensor:
        """Regularized backward of one micro-batch; returns the general token-mean loss / accumulation steps."""
        reg = self._dr_get_regularizer(model)
        stats: dict = {}
        loss_fn = self._dr_loss_fn()
        if self._dr_wants_stats():  # TRL's own metrics, from the general rows of pass 1's forward
            loss_fn = _tapped(loss_fn, general["input_ids"].shape[0], stats)
        loss_fn = self._dr_head(loss_fn, reg)
        ga = self.current_gradient_accumulation_steps
        lr = float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else None
        if self._dr_two_pass(reg):
            rep = self._dr_backward_two_pass(model, reg, general, target, loss_fn, lr, ga)
        else:
            rep = self._dr_backward_one_pass(reg, general, target, loss_fn, lr, ga)
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
        from accelerate.utils import DistributedType

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


# --------------------------------------------------------------------------- LM head on label positions only
class _FullInputs(torch.nn.Module):
    """Runs ``model`` on the full ``input_ids`` / ``attention_mask`` (R, T) with ``logits_to_keep=k`` (Hugging Face
    causal LMs: the LM head projects only the last ``k`` positions, logits (R, k, V)), whatever trimmed inputs the
    loss passes in."""

    def __init__(self, model, input_ids: Tensor, attention_mask: Tensor | None, keep: int):
        super().__init__()
        self.inner = model
        self.ids, self.mask, self.keep = input_ids, attention_mask, keep

    def forward(self, **kw):
        kw = {k: v for k, v in kw.items() if k not in ("input_ids", "attention_mask")}
        return self.inner(input_ids=self.ids, attention_mask=self.mask, logits_to_keep=self.keep, **kw)


def _accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if is_peft_model(model) else model
    try:
        return "logits_to_keep" in inspect.signature(type(base).forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forward
        return False


def _label_positions_only(loss_fn):
    """``loss_fn`` with the LM head run only from the position before the batch's earliest label token onward (the
    prompt columns that precede every row's completion get no logits): the model still sees the full rows, the loss
    sees the last ``k`` columns of every per-token (R, T) tensor of the batch (labels, token-aligned log-probs, ...),
    whose first column carries no label. Same loss and gradient; less LM-head work and no (R, T, V) logits. TRL's
    plain trainers do the same with their fused LM head."""

    def fn(model, batch):
        labels = batch["labels"]  # (R, T)
        R, T = labels.shape
        cols = torch.nonzero((labels[:, 1:] != -100).any(0)).flatten()  # columns t+1 with a label in some row
        keep = T - int(cols[0]) if cols.numel() else T  # logits of positions first_label - 1 .. T - 1
        if keep >= T:
            return loss_fn(model, batch)
        trimmed = {k: (v[:, T - keep:] if isinstance(v, Tensor) and v.dim() >= 2 and tuple(v.shape[:2]) == (R, T)
                       else v) for k, v in batch.items()}
        return loss_fn(_FullInputs(model, batch["input_ids"], batch.get("attention_mask"), keep), trimmed)

    return fn


# --------------------------------------------------------------------------- logit tap for TRL's metrics
class _Tap(torch.nn.Module):
    """Calls ``model`` and hands its logits (R, T, V), detached, to ``fn`` before returning the output unchanged."""

    def __init__(self, model, fn):
        super().__init__()
        self.inner = model
        self.fn = fn

    def forward(self, **kw):
        out = self.inner(**kw)
        with torch.no_grad():
            self.fn((out.logits if hasattr(out, "logits") else out[0]).detach())
        return out


def _token_stats(logits: Tensor, labels: Tensor, max_elems: int = 1 << 22) -> dict[str, Tensor]:
    """Per-row sums over each row's loss tokens (shifted ``labels != -100``), in fp32, a few rows at a time so no
    second full (R, T, V) tensor is held: ``valid`` tokens, ``entropy``, ``correct`` (top-1 == label), ``logits``
    (mean logit over the vocabulary), ``logp`` (log-prob of the label). logits (R, T, V), labels (R, T) -> each (R,)."""
    cols = torch.nonzero((labels[:, 1:] != -100).any(0)).flatten()
    if cols.numel():  # leading columns without a label in any row carry nothing
        logits, labels = logits[:, int(cols[0]):], labels[:, int(cols[0]):]
    R, T, V = logits.shape
    step = max(1, max_elems // max(1, (T - 1) * V))
    parts: dict[str, list[Tensor]] = {k: [] for k in ("valid", "entropy", "correct", "logits", "logp")}
    for r0 in range(0, R, step):
        lg = logits[r0:r0 + step, :-1].float()  # (r, T-1, V)
        lab = labels[r0:r0 + step, 1:]  # (r, T-1)
        mask = lab != -100
        logp = lg.log_softmax(-1)
        tok = logp.gather(-1, lab.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (r, T-1)
        parts["valid"].append(mask.sum(-1).float())
        parts["entropy"].append((-(logp.exp() * logp).sum(-1) * mask).sum(-1))
        parts["correct"].append(((lg.argmax(-1) == lab) & mask).sum(-1).float())
        parts["logits"].append((lg.mean(-1) * mask).sum(-1))
        parts["logp"].append((tok * mask).sum(-1))
    return {k: torch.cat(v) for k, v in parts.items()}


def _tapped(loss_fn, rows: int, stats: dict):
    """``loss_fn`` whose first call also fills ``stats`` with :func:`_token_stats` of the batch's first ``rows``
    rows (the general rows of a merged batch); later calls (a second pass) run ``loss_fn`` untouched."""

    def fn(model, batch):
        if stats:
            return loss_fn(model, batch)
        labels = batch["labels"][:rows]
        return loss_fn(_Tap(model, lambda logits: stats.update(_token_stats(logits[:rows], labels))), batch)

    return fn


def _interleave(x: Tensor) -> Tensor:
    """(2P, ...) as [chosen rows; rejected rows] -> (2P, ...) alternating chosen/rejected."""
    P = x.shape[0] // 2
    return torch.stack([x[:P], x[P:]], 1).reshape(2 * P, *x.shape[1:])


# --------------------------------------------------------------------------- SFT
class DrSFTTrainer(_DrMixin, SFTTrainer):
    """``SFTTrainer`` with a data-regularized step (see the module docstring)."""

    def __init__(self, *args, target_dataset=None, dr_method: str = "layerwise_subset", dr_options: dict | None = None,
                 target_batch_size: int = 1, dr_sampler: str | dict | None = None, dr_prefilter: str | None = None,
                 dr_prefilter_frac: float = 0.1, **kwargs):
        """``dr_sampler``: the general pool's distribution (``drpost.trainers.samplers.Guidance``: None or
        ``"uniform"`` = the Trainer's own sampler; ``"guided"`` or a dict of options = score-guided draws on hashed
        token n-grams, single process). ``dr_prefilter="dsir"``: keep the DSIR-resampled ``dr_prefilter_frac`` of
        ``train_dataset`` (decoded rows vs decoded target rows) before training."""
        super().__init__(*args, **kwargs)
        if self.padding_free or self.args.packing:
            raise ValueError("DrSFTTrainer needs one sequence per row: set padding_free=False and packing=False")
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

    def _dr_backward(self, model, general: dict, target: dict) -> Tensor:
        loss = super()._dr_backward(model, general, target)
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
        valid = self._dr_total(stats["valid"])
        m["entropy"].append(self._dr_total(stats["entropy"]) / valid if valid > 0 else 0.0)
        m["mean_token_accuracy"].append(self._dr_total(stats["correct"]) / valid if valid > 0 else 0.0)
        self._dr_count_tokens(general)


# --------------------------------------------------------------------------- DPO
class DrDPOTrainer(_DrMixin, DPOTrainer):
    """``DPOTrainer`` with a data-regularized step; one sample = one preference pair."""

    def __init__(self, *args, target_dataset=None, dr_method: str = "layerwise_subset", dr_options: dict | None = None,
                 target_batch_size: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        bad = []
        if list(self.loss_types) != ["sigmoid"]:
            bad.append(f"loss_type={self.loss_types} (only ['sigmoid'])")
        if self.f_divergence_type != "reverse_kl":
            bad.append(f"f_divergence_type={self.f_divergence_type!r}")
        if self.ld_alpha is not None:
            bad.append("ld_alpha")
        if self.use_weighting:
            bad.append("use_weighting")
        if getattr(self, "_is_vision_dataset", False):
            bad.append("vision datasets")
        if bad:
            raise NotImplementedError("DrDPOTrainer does not support: " + ", ".join(bad))
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
        valid = self._dr_total(stats["valid"])
        m["entropy"].append(self._dr_total(stats["entropy"]) / valid if valid > 0 else 0.0)
        for side, sl in (("chosen", slice(0, None, 2)), ("rejected", slice(1, None, 2))):
            n = self._dr_total(stats["valid"][sl])
            m[f"logits/{side}"].append(self._dr_total(stats["logits"][sl]) / n if n > 0 else 0.0)
        n_c = self._dr_total(stats["valid"][0::2])
        m["mean_token_accuracy"].append(self._dr_total(stats["correct"][0::2]) / n_c if n_c > 0 else 0.0)
        self._dr_count_tokens(general)


# --------------------------------------------------------------------------- GRPO
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
        if bad:
            raise NotImplementedError("DrGRPOTrainer does not support: " + ", ".join(bad))
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

