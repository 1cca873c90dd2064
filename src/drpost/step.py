"""``DataRegularizer``: one data-regularized step (docs/design.md, sections 2-7).

    reg = drpost.DataRegularizer(model, method="layerwise_subset", frac=0.5, scoring="auto")
    report = reg.step(general=batch_g, target=batch_t, loss_fn=drpost.objectives.causal_lm_loss)  # fills .grad
    optimizer.step(); optimizer.zero_grad()

One step, as named stages over a ``MergedBatch`` (``assembly="one_pass"``, the default):
  1. ``_forward``: target rows after the general rows in one batch, ``loss_fn`` -> per-row loss sums and counts;
  2. ``_backward``: back-propagate the sum of all rows' losses once, capturing each layer's (A, B)
     (geometry/capture.py, which also checks that every trainable parameter is accounted for) and skipping
     autograd's own weight gradients; a weight whose per-row gradients are smaller than its factors (LoRA) gets
     them right there, and its factors are freed;
  3. geometry (``LocalGeometry`` or, data-parallel, ``DistributedStep``): per block, scores <u_i, g_T> and the Gram
     where the feasible set needs it, by the scoring method the cost model picks per block shape (blocks holding
     per-row gradients: one GEMM each, finished together);
  4. ``_solve``: the feasible set turns them into coefficients of ``d = sum_i c_i u_i + c_T g_T`` (feasible/);
  5. ``_assemble``: every parameter's ``d`` with one GEMM per use from the captured factors (one GEMV over held
     per-row gradients), each block's factors freed once its update is built, added to ``.grad``. A separable
     layer-scope set (LayerWiseSubset) has its ``direct``-scored blocks solved and assembled already in 3, as
     each was scored (geometry/stream.py).
Stages 2-5 run outside any autocast region (as a trainer runs its backward): products accumulate in float32.
``assembly="two_pass"`` replaces 5 by a second, ordinary forward/backward of the weighted loss (the reference).
``full_training`` and ``target_only`` (without ``report_scores`` or ``slack``) weigh rows by token counts alone, so
they skip 2, 3 and 5: no capture, one ordinary backward of ``sum_r c_r loss_r`` (any model, at a plain step's cost).
A non-finite loss, geometry or update skips the step: ``.grad`` and the weights are left untouched; so does a
refusal (``UnsupportedModelError``). The math: docs/design.md.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from drpost.feasible import make_feasible
from drpost.feasible.base import (
    Coefficients,
    StepGeometry,
    ensure_finite,
    fallback_full_training,
    solver_failure,
)
from drpost.feasible.slack import WithSlack
from drpost.geometry import cost
from drpost.geometry.capture import Capture
from drpost.geometry.kernels import METHODS, Sketcher, assemble
from drpost.geometry.step_geometry import (  # noqa: F401  (merge_batches, take_rows: public batch helpers)
    LocalGeometry,
    MergedBatch,
    Timer,
    merge_batches,
    row_coefficients,
    take_rows,
    time_candidates,
)
from drpost.geometry.stream import Streamer

ASSEMBLIES = ("one_pass", "two_pass")


class Needs(NamedTuple):
    """What the step's geometry must compute for the chosen feasible set."""

    gram: bool  # <u_i, u_j> between general samples
    target_gram: bool  # between target samples (automatic strength)
    trivial: bool  # full_training / target_only without scores: no scoring at all


@dataclass
class StepReport:
    """What one step did. ``weights[l, i]`` is the coefficient of general sample i's summed-loss gradient u_i in
    block l's update (one row for scope global); ``target_weight[l]`` that of the token-mean target gradient."""

    skipped: bool = False
    skip_reason: str | None = None
    scores: Tensor | None = None  # (n,)    <u_i, g_T> summed over blocks
    block_scores: Tensor | None = None  # (L, n)
    weights: Tensor | None = None  # (L', n)  L' = 1 (global scope) or L (layer scope)
    target_weight: Tensor | None = None  # (L',)
    blocks: list[str] = field(default_factory=list)
    scoring: dict[str, str] = field(default_factory=dict)
    streamed: list[str] = field(default_factory=list)  # blocks solved and assembled as scored (geometry/stream.py)
    loss: float = math.nan  # token-mean loss of the general rows
    target_loss: float = math.nan  # token-mean loss of the target rows
    counts: Tensor | None = None  # (n,) loss tokens per general sample
    timings: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __bool__(self) -> bool:  # a report is truthy unless the step was skipped
        return not self.skipped



# --------------------------------------------------------------------------- the regularizer
class DataRegularizer:
    """Data-regularized update: project the target gradient onto a feasible set built from the general batch.

    Args:
        model: any ``nn.Module`` (a Hugging Face causal LM, a PEFT model, ...); its trainable parameters are updated.
        method: feasible set name (``full_training``, ``target_only``, ``global_subset``, ``layerwise_subset``,
            ``hull``, ``capped_simplex``, ``cone``, ``span``, ``ball``, ``halfspace``, ``gem``).
        scoring: ``auto`` (per-block cost model) or ``full_ghost`` / ``reduced_ghost`` / ``direct`` / ``compress``.
        assembly: ``one_pass`` (default; update assembled from the captured factors) or ``two_pass`` (reference:
            a second forward/backward of the weighted loss).
        slack: None, a radius >= 0 or ``"auto"``: use C + ball(slack) instead of C.
        sketch: ``"k_out x k_in"`` sizes for ``compress`` scoring and the running target-noise estimate.
        seed: seed of the sketch matrices.
        optimizer: optional; its current learning rate feeds greedy selection.
        linear_only: score and update only Linear/Conv1D layers (others are frozen during the step).
        report_scores: also compute scores for full_training / target_only (otherwise skipped: not needed).
        autotune: with ``scoring="auto"``, time every exact candidate once on the first sight of each block shape
            (block, rows, target rows, T, Gram needed, positions its uses ran on) and keep the fastest, instead of
            trusting the cost model.
        process_group: data parallelism (geometry/distributed.py, docs/distributed.md): ``"auto"`` (default)
            computes the global step over all ranks when torch.distributed is initialized with world size > 1;
            None keeps each rank's step local; or a ProcessGroup. Pass the unwrapped module, not a DDP wrapper.
        **set_options: the feasible set's options (``frac``, ``selection``, ``scope``, ``k``, ``radius``, ...).

    Raises ``UnsupportedModelError`` (at a step, before ``.grad`` is touched) for a parameter whose per-sample
    gradients cannot be captured exactly; the message names it and says what to do.
    """

    def __init__(self, model: nn.Module, method: str = "layerwise_subset", *, scoring: str = "auto",
                 assembly: str = "one_pass", slack: float | str | None = None, sketch: str = "64x64",
                 seed: int = 0, optimizer: torch.optim.Optimizer | None = None, linear_only: bool = False,
                 report_scores: bool = False, autotune: bool = False, process_group="auto", **set_options):
        if scoring != "auto" and scoring not in METHODS:
            raise ValueError(f"option 'scoring' must be 'auto' or one of {METHODS}, got {scoring!r}")
        if assembly not in ASSEMBLIES:
            raise ValueError(f"option 'assembly' must be one of {ASSEMBLIES}, got {assembly!r}")
        if slack is not None and slack != "auto" and not (isinstance(slack, (int, float)) and slack >= 0):
            raise ValueError(f"option 'slack' must be None, a number >= 0 or 'auto', got {slack!r}")
        if method == "full_training" and "scope" in set_options and slack is None:
            raise ValueError("option 'scope' changes nothing for method 'full_training' (one point) unless 'slack' "
                             "is set (then it scopes the slack ball); drop it")
        self.model = model
        self.method = method
        self.feasible = make_feasible(method, **set_options)
        if slack is not None:  # C + ball(slack): one wrapper for every set (feasible/slack.py)
            self.feasible = WithSlack(self.feasible, slack)
        self.scoring = scoring
        self.assembly = assembly
        self.slack = slack
        self.sketch = _parse_sketch(sketch)
        self.optimizer = optimizer
        self.report_scores = report_scores
        self.autotune = bool(autotune)
        self.process_group = process_group
        self.capture = Capture(model, linear_only=linear_only)
        self.sketcher = Sketcher(*self.sketch, seed=seed)
        self.rates = cost.Rates()
        self.local_geometry = LocalGeometry()
        # scoring method per (block, rows, target rows, T, Gram needed, positions its uses ran on)
        self._choice: dict[tuple, str] = {}
        self._cast: dict = {}  # the caller's autocast during the current step (``_autocast_state``)
        self._needs_capture = False  # full_training / target_only's loss reached a leaf the shortcut cannot serve

    # ------------------------------------------------------------------ public
    @property
    def blocks(self) -> list[str]:
        return [b.name for b in self.capture.blocks]

    def step(self, general: dict, target: dict, loss_fn, lr: float | None = None) -> StepReport:
        """Fill ``.grad`` of the trainable parameters with the regularized update (added to any existing grad)."""
        return self._run(general, target, loss_fn, lr, write_grads=True)

    def row_weights(self, general: dict, target: dict, loss_fn, lr: float | None = None) -> tuple[Tensor, StepReport]:
        """Row coefficients ``c`` of the merged batch (general rows, then target rows) without touching ``.grad``:
        the update is the gradient of ``sum_r c_r loss_r`` (``loss_fn``'s row losses). Returns ``(c (R,), report)``
        for global-scope sets, ``(c (L, R), report)`` per block for layer scope, ``(None, report)`` on a skipped step.
        Distributed: coefficients are globally normalized, rows are this rank's (sum the ranks' gradients)."""
        rep = self._run(general, target, loss_fn, lr, write_grads=False)
        c = rep.info.pop("row_weights", None)
        if c is not None and rep.weights is not None and rep.weights.shape[0] == 1:
            c = c[0]
        return c, rep

    def needs(self) -> Needs:
        fs = self.feasible
        trivial = fs.name in ("full_training", "target_only") and not self.report_scores and self.slack is None
        return Needs(fs.needs_gram, fs.needs_target_gram, trivial)

    def scoring_method(self, block_idx: int, block, n_rows: int, m_rows: int, T: int, need_gram: bool,
                       tc: Tensor | None = None, assembly_rows: float | None = None):
        """(method, stats or None) for a block at these shapes: the fixed ``scoring``, or the cost model's choice
        (cached per shape). With ``autotune`` and the target coefficients ``tc`` (R,), the first sight of a shape
        times every exact candidate and returns the fastest together with the stats it computed.
        ``assembly_rows``: the block would stream under ``direct`` (``cost.choose``; autotune, which times the
        scoring alone, leaves such a block to the cost model)."""
        if block.rows is not None and self.scoring != "compress":
            return "direct", None  # per-row gradients materialized in the backward: every exact method reads them
        if self.scoring != "auto":
            return self.scoring, None
        key = (block_idx, n_rows, m_rows, T, need_gram, cost.positions(block))
        if assembly_rows is not None:
            key += (round(float(assembly_rows), 3),)
        if key not in self._choice:  # re-decided whenever the shapes change (an LM head's loss window too)
            if self.autotune and tc is not None and block.factored and assembly_rows is None:
                needs = self.needs()
                cands = ["full_ghost", "direct"] + ([] if need_gram else ["reduced_ghost"])
                meth, st = time_candidates(block, block_idx, cands, tc, n_rows, needs.gram, needs.target_gram,
                                           self.sketcher)
                self._choice[key] = meth
                return meth, st
            self._choice[key] = cost.choose(block, n_rows, m_rows, T, need_gram, self.rates, assembly_rows)
        return self._choice[key], None

    def state_dict(self) -> dict:
        """Running state for checkpoints: scoring choices and automatic-strength estimates."""
        state: dict = {"choice": [[list(k), v] for k, v in self._choice.items()]}
        auto = getattr(self.feasible, "auto", None)
        if auto is not None:
            state["feasible_auto"] = auto.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._choice = {tuple(k): v for k, v in state.get("choice", [])}
        auto = getattr(self.feasible, "auto", None)
        saved = state.get("feasible_auto", state.get("slack_strength"))  # slack_strength: checkpoints before 0.2
        if saved is not None and auto is not None:
            auto.load_state_dict(saved)

    # ------------------------------------------------------------------ the stages
    def _run(self, general: dict, target: dict, loss_fn, lr, write_grads: bool) -> StepReport:
        device = next(self.model.parameters()).device
        mb = MergedBatch.build(general, target, device)
        if lr is None and self.optimizer is not None:
            lr = float(self.optimizer.param_groups[0]["lr"])
        report, timer = StepReport(blocks=self.blocks), Timer(device)
        # coefficients known before any gradient: no capture, one plain backward (unless a step showed it cannot)
        plain = self.needs().trivial and not self._needs_capture
        self._cast = _autocast_state(device)  # the caller's autocast, for forwards (the two-pass reference's too)
        rest = contextlib.ExitStack()
        try:
            loss_sums = self._forward(mb, loss_fn, timer, report, capture=not plain)
            if plain and not _leaves_within(loss_sums, self.capture):  # e.g. a value head outside the model
                self._needs_capture = True  # the later steps capture at once instead of forwarding twice
                self.capture.reset()
                plain = False
                loss_sums = self._forward(mb, loss_fn, timer, report)
            # everything after the forward outside any autocast region, as a trainer runs its backward: factors
            # keep the forward's compute dtype, and scores, Grams and the assembly accumulate in float32
            rest.enter_context(torch.autocast(device.type, enabled=False))
            ds = self._parallel(loss_sums, mb, report)  # None unless data-parallel
            if not (ds.finite if ds is not None else bool(torch.isfinite(loss_sums.detach()).all())):
                return _skip(report, "non-finite loss")
            _check_tokens(mb)
            blocks = self.capture.blocks
            if not plain:
                with timer("backward"):
                    blocks = self._backward(loss_sums)
            stream = None  # a separable set's blocks solved and assembled as they are scored (geometry/stream.py)
            if write_grads and self.assembly == "one_pass" and not plain and ds is None and self.feasible.separable:
                stream = Streamer(self.feasible, mb, lr, timer)
            geo = (ds.geometry(self, blocks, mb, lr, timer, report) if ds is not None
                   else self.local_geometry.geometry(self, blocks, mb, lr, timer, report, stream=stream))
            if geo is None:
                return _skip(report, "non-finite scores or Gram")
            with timer("solve"):
                coefs = self._solve(geo, ds, report, stream)
            if not ensure_finite(coefs.coef, coefs.target_coef):
                return _skip(report, "non-finite solver output")
            row_c = row_coefficients(coefs, mb, ds, len(blocks))  # (L, R)
            if not write_grads:
                report.info["row_weights"] = row_c
                return report
            if plain:
                with timer("backward"):
                    grads = _weighted_grads(loss_sums, row_c, self.capture.blocks)
            else:
                with timer("assembly"):
                    grads = self._assemble(blocks, mb, loss_fn, row_c, coefs, stream)
            if ds is not None:
                with timer("all_reduce"):
                    grads = ds.reduce_grads(grads, [p for b in self.capture.blocks for p in b.params])
            if not all_finite(list(grads.values())):
                return _skip(report, "non-finite update")
            _add_to_grad(grads, fresh=self.assembly == "one_pass")
            return report
        finally:
            rest.close()
            self.capture.reset()
            report.timings = timer.t

    def _forward(self, mb: MergedBatch, loss_fn, timer: Timer, report: StepReport, capture: bool = True) -> Tensor:
        """Stage 1: one forward of the merged batch, with the capture installed unless the step needs no per-row
        gradients (``capture=False``).  -> (R,) per-row loss sums"""
        with (self.capture if capture else contextlib.nullcontext()), timer("forward"):
            if capture:
                self.capture.start(mb.R, mb.T)
            loss_sums, counts = loss_fn(self.model, mb.batch)
        _check_loss_shapes(loss_sums, counts, mb.R)
        mb.set_counts(counts.detach().to(loss_sums.dtype))
        report.counts = mb.counts
        report.loss = float(loss_sums[: mb.R_g].detach().sum() / mb.counts.sum().clamp_min(1))
        report.target_loss = float(loss_sums[mb.R_g:].detach().sum() / mb.target_counts.sum().clamp_min(1))
        return loss_sums

    def _backward(self, loss_sums: Tensor) -> list:
        """Stage 2: one captured backward of the rows' summed losses, then the per-block factors (checked by the
        capture's accounting)."""
        self.capture.backward(loss_sums.sum())
        return self.capture.collect()

    def _parallel(self, loss_sums: Tensor, mb: MergedBatch, report: StepReport):
        """Data parallelism (geometry/distributed.py): the global counts and losses, or None for a local step."""
        if self.process_group is None:
            return None
        from drpost.geometry.distributed import DistributedStep, resolve_process_group

        group = resolve_process_group(self.process_group)
        if group is None:
            return None
        return DistributedStep.begin(group, loss_sums, mb.R_g, mb.counts, mb.target_counts, report)

    def _solve(self, geo: StepGeometry, ds, report: StepReport, stream: Streamer | None = None) -> Coefficients:
        """Stage 4: coefficients from the feasible set (slack included: ``WithSlack``); an unconverged solve falls
        back to standard training for this step, without slack. Blocks already solved and assembled as they were
        scored (``stream``) keep the coefficients their updates were built with."""
        coefs = self.feasible(geo)
        inner = getattr(self.feasible, "inner", self.feasible)
        failure = solver_failure(coefs.info, getattr(inner, "max_iter", None))
        if failure is not None:
            if stream is not None and stream.coef:  # a separable set has no iterative solver: never reached
                raise RuntimeError(f"drpost: a streamed layer-scope step cannot fall back ({failure})")
            coefs = fallback_full_training(geo, failure)
        if stream is not None:
            coefs = stream.override(coefs)
            report.streamed = [self.capture.blocks[l].name for l in sorted(stream.coef)]
        if ds is not None:
            ds.agree(coefs)
        report.weights, report.target_weight = coefs.coef, coefs.target_coef
        report.info.update(coefs.info)
        return coefs

    def _assemble(self, blocks, mb: MergedBatch, loss_fn, row_c: Tensor, coefs: Coefficients,
                  stream: Streamer | None = None) -> dict:
        """Stage 5: every parameter's update, from the captured factors (one pass) or a second backward; a block
        streamed during scoring already has its update."""
        if self.assembly == "two_pass":
            self.capture.reset()  # free the factors before the second forward
            return self._second_pass(mb.batch, loss_fn, row_c, coefs.coef.shape[0] == 1)
        grads = {}
        host = row_c.detach().cpu()  # (L, R) one sync: plans which rows each block's GEMM needs
        for l, b in enumerate(blocks):
            if stream is not None and l in stream.grads:
                grads.update(stream.grads.pop(l))
                continue
            grads.update(assemble(b, row_c[l], host[l]))
            b.clear()  # its factors are spent: the next blocks' updates reuse their memory
        return grads

    def _second_pass(self, merged: dict, loss_fn, row_c: Tensor, shared: bool) -> dict:
        """Reference assembly: ordinary forward/backward of sum_r c_r loss_r (one backward per block if layer)."""
        if shared:  # one weight vector for every block: run only the rows that carry weight
            keep = torch.nonzero(row_c[0] != 0).flatten()
            if keep.numel() == 0:
                return {p: torch.zeros_like(p) for b in self.capture.blocks for p in b.params}
            merged, row_c = take_rows(merged, keep), row_c[:1, keep]
        with torch.autocast(**self._cast):  # the same precision as the step's forward
            loss_sums, _ = loss_fn(self.model, merged)
        return _weighted_grads(loss_sums, row_c, self.capture.blocks)


# --------------------------------------------------------------------------- helpers of the stages
def _autocast_state(device: torch.device) -> dict:
    """``torch.autocast`` arguments that restore the caller's autocast state on this device."""
    on = torch.is_autocast_enabled(device.type)
    return {"device_type": device.type, "enabled": on,
            **({"dtype": torch.get_autocast_dtype(device.type)} if on else {})}


def _leaves_within(loss: Tensor, capture: Capture) -> bool:
    """Whether ``loss``'s graph reaches only leaves of the captured blocks (or ones the capture freezes) and no
    reentrant checkpoint (``autograd.grad`` cannot run through one). Otherwise the fixed-weight shortcut would
    change what the step gives them: the captured backward hands every other leaf (a trainer's value head) the
    gradient of the rows' summed losses, as a plain ``loss.sum().backward()`` would."""
    ok = {id(p) for b in capture.blocks for p in b.params} | {id(p) for p in capture.frozen}
    seen, stack = set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # AccumulateGrad: a leaf
        if (var is not None and id(var) not in ok) or type(fn).__name__.startswith("CheckpointFunction"):
            return False
        stack.extend(f for f, _ in fn.next_functions)
    return True


def _weighted_grads(loss_sums: Tensor, row_c: Tensor, blocks) -> dict:
    """full_training / target_only: the update is the gradient of ``sum_r c_r loss_r`` with coefficients that need
    no gradient (token means), so one ordinary backward computes it, with autograd's own weight gradients; no
    factors are captured. ``row_c`` (L, R) has one row per block only if a set scopes its fixed weights by block."""
    params = [p for b in blocks for p in b.params]
    if bool((row_c == row_c[:1]).all()):
        gs = torch.autograd.grad((loss_sums * row_c[0].to(loss_sums.dtype)).sum(), params, allow_unused=True)
        return {p: (torch.zeros_like(p) if g is None else g) for p, g in zip(params, gs, strict=True)}
    out = {}
    for l, b in enumerate(blocks):
        gs = torch.autograd.grad((loss_sums * row_c[l].to(loss_sums.dtype)).sum(), b.params, retain_graph=True,
                                 allow_unused=True)
        out.update({p: (torch.zeros_like(p) if g is None else g) for p, g in zip(b.params, gs, strict=True)})
    return out


def _add_to_grad(grads: dict, fresh: bool) -> None:
    """Add each update to ``.grad`` in the parameter's dtype (``fresh``: the tensors are new, no defensive copy)."""
    for p, g in grads.items():
        same = g.dtype == p.dtype
        g = g.to(p.dtype)
        if p.grad is None:
            p.grad = g.contiguous() if (fresh or not same) else g.clone()
        else:
            p.grad.add_(g)


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one reduction per tensor and one host sync per device
    (not an elementwise mask of the whole update): NaN and inf propagate through a sum, so a finite total proves
    every element finite; only a non-finite total (a NaN or inf, or finite values whose sum overflows) is checked
    element by element."""
    sums: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        if t.numel():
            sums.setdefault(t.device, []).append(t.sum().float())  # (): float32, whatever the dtype
    if all(bool(torch.isfinite(torch.stack(ss).sum())) for ss in sums.values()):
        return True
    return ensure_finite(*tensors)


def _check_tokens(mb: MergedBatch) -> None:
    if float(mb.target_counts.sum()) <= 0:
        raise ValueError("option 'target': the target rows have no loss tokens (all labels are -100)")
    if float(mb.counts.sum()) <= 0:
        raise ValueError("option 'general': the general rows have no loss tokens (all labels are -100)")


def _parse_sketch(s) -> tuple[int, int]:
    try:
        if isinstance(s, int):
            return s, s
        a, b = str(s).lower().split("x")
        k = int(a), int(b)
        if min(k) < 1:
            raise ValueError
        return k
    except ValueError:
        raise ValueError(f"option 'sketch' must look like '64x64', got {s!r}") from None


def _check_loss_shapes(loss_sums, counts, R):
    if not (isinstance(loss_sums, Tensor) and isinstance(counts, Tensor)):
        raise TypeError("loss_fn must return (row_loss_sums, row_token_counts) tensors")
    if loss_sums.shape != (R,) or counts.shape != (R,):
        raise ValueError(f"loss_fn must return two ({R},) tensors (one entry per row), got "
                         f"{tuple(loss_sums.shape)} and {tuple(counts.shape)}")


def _skip(report: StepReport, reason: str) -> StepReport:
    report.skipped = True
    report.skip_reason = reason
    return report
