"""``DataRegularizer``: one data-regularized step (DESIGN.md sections 1-3, 8).

    reg = drpost.DataRegularizer(model, method="layerwise_subset", frac=0.5, scoring="auto")
    report = reg.step(general=batch_g, target=batch_t, loss_fn=drpost.objectives.causal_lm_loss)  # fills .grad
    optimizer.step(); optimizer.zero_grad()

One step (``assembly="one_pass"``, the default):
  1. concatenate target rows to the general rows (one merged batch), forward, ``loss_fn`` -> per-row loss sums;
  2. back-propagate the sum of all rows' losses once, capturing each layer's (A, B) (geometry/capture.py) and
     skipping autograd's own weight gradients;
  3. per block: scores <u_i, g_T>, and the Gram where the feasible set needs it (geometry/kernels.py), by the
     scoring method the cost model picks per block shape;
  4. the feasible set turns them into coefficients of ``d = sum_i c_i u_i + c_T g_T`` (feasible/);
  5. assemble every parameter's ``d`` with one GEMM per use from the captured factors and add it to ``.grad``.
``assembly="two_pass"`` replaces 5 by a second, ordinary forward/backward of the weighted loss (the reference).
A non-finite loss, geometry or update skips the step: ``.grad`` and the weights are left untouched.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from drpost.feasible import make_feasible
from drpost.feasible.base import Coefficients, StepGeometry, ensure_finite
from drpost.geometry import cost
from drpost.geometry.capture import Capture
from drpost.geometry.kernels import METHODS, Sketcher, assemble, block_stats

ASSEMBLIES = ("one_pass", "two_pass")


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
    loss: float = math.nan  # token-mean loss of the general rows
    target_loss: float = math.nan  # token-mean loss of the target rows
    counts: Tensor | None = None  # (n,) loss tokens per general sample
    timings: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __bool__(self) -> bool:  # a report is truthy unless the step was skipped
        return not self.skipped


# --------------------------------------------------------------------------- batches
def _pad_to(x: Tensor, T: int, value) -> Tensor:
    if x.shape[1] == T:
        return x
    pad = x.new_full((x.shape[0], T - x.shape[1], *x.shape[2:]), value)
    return torch.cat([x, pad], 1)


def _rows_of(batch: dict) -> int:
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ValueError("a batch must be a dict with at least 'input_ids' (R, T)")
    return int(batch["input_ids"].shape[0])


def _sample_ids(batch: dict, R: int, device) -> Tensor:
    """Compact sample ids 0..n-1 for the rows of a batch (every row its own sample by default)."""
    si = batch.get("sample_index")
    if si is None:
        return torch.arange(R, device=device)
    si = torch.as_tensor(si, device=device)
    if si.shape != (R,):
        raise ValueError(f"'sample_index' must have shape ({R},), got {tuple(si.shape)}")
    return torch.unique(si, sorted=True, return_inverse=True)[1]


def merge_batches(general: dict, target: dict, device) -> dict:
    """Concatenate target rows after the general rows, right-padding sequence tensors to a common length."""
    Tg, Tt = general["input_ids"].shape[1], target["input_ids"].shape[1]
    T = max(Tg, Tt)
    missing = set(general) ^ set(target)
    missing.discard("sample_index")
    if missing:
        raise ValueError(f"general and target batches must carry the same keys; differing: {sorted(missing)}")
    out = {}
    for k, g in general.items():
        if k == "sample_index":
            continue
        t = target[k]
        if not isinstance(g, Tensor):
            out[k] = g
            continue
        g, t = g.to(device), torch.as_tensor(t).to(device)
        if g.dim() >= 2 and g.shape[1] == Tg and t.shape[1] == Tt:
            fill = -100 if k == "labels" else 0
            g, t = _pad_to(g, T, fill), _pad_to(t, T, fill)
        out[k] = torch.cat([g, t], 0)
    return out


def take_rows(batch: dict, idx: Tensor) -> dict:
    R = _rows_of(batch)
    return {k: (v[idx] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == R else v) for k, v in batch.items()}


def _indicator(ids: Tensor, n: int, dtype) -> Tensor:
    """(n, R) with S[i, r] = 1 if row r belongs to sample i."""
    return torch.nn.functional.one_hot(ids, n).t().to(dtype)


class _Timer:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.t: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                if timer.cuda:
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                if timer.cuda:
                    torch.cuda.synchronize()
                timer.t[name] = timer.t.get(name, 0.0) + time.perf_counter() - self.t0

        return _Ctx()


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
            (block, rows, target rows, T, Gram needed) and keep the fastest, instead of trusting the cost model.
        process_group: data parallelism (integrations/distributed.py, docs/distributed.md): ``"auto"`` (default)
            computes the global step over all ranks when torch.distributed is initialized with world size > 1;
            None keeps each rank's step local; or a ProcessGroup. Pass the unwrapped module, not a DDP wrapper.
        **set_options: the feasible set's options (``frac``, ``selection``, ``scope``, ``k``, ``radius``, ...).
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
        self.scoring = scoring
        self.assembly = assembly
        self.slack = slack
        self.sketch = _parse_sketch(sketch)
        self.optimizer = optimizer
        self.report_scores = report_scores
        self.autotune = bool(autotune)
        self.process_group = process_group
        self._weights_only = False  # set by row_weights(): stop before assembling .grad
        self.capture = Capture(model, linear_only=linear_only)
        self.sketcher = Sketcher(*self.sketch, seed=seed)
        self.rates = cost.Rates()
        self._choice: dict[tuple, str] = {}
        self._slack_strength = None
        if slack is not None:
            from drpost.feasible.convex import apply_slack  # noqa: F401  (fail early if unavailable)
            if slack == "auto":
                from drpost.feasible.strength import AutoStrength

                self._slack_strength = AutoStrength()

    # ------------------------------------------------------------------ public
    @property
    def blocks(self) -> list[str]:
        return [b.name for b in self.capture.blocks]

    def row_weights(self, general: dict, target: dict, loss_fn, lr: float | None = None) -> tuple[Tensor, StepReport]:
        """Row coefficients ``c`` of the merged batch (general rows, then target rows) without touching ``.grad``:
        the update is the gradient of ``sum_r c_r loss_r`` (``loss_fn``'s row losses). Returns ``(c (R,), report)``
        for global-scope sets, ``(c (L, R), report)`` per block for layer scope, ``(None, report)`` on a skipped step.
        Distributed: coefficients are globally normalized, rows are this rank's (sum the ranks' gradients)."""
        self._weights_only = True
        try:
            rep = self.step(general, target, loss_fn, lr=lr)
        finally:
            self._weights_only = False
        c = rep.info.pop("row_weights", None)
        if c is not None and rep.weights is not None and rep.weights.shape[0] == 1:
            c = c[0]
        return c, rep

    def step(self, general: dict, target: dict, loss_fn, lr: float | None = None) -> StepReport:
        """Fill ``.grad`` of the trainable parameters with the regularized update (added to any existing grad)."""
        if target is None or _rows_of(target) == 0:
            raise ValueError("option 'target': the target batch is empty; drpost needs at least one target row")
        R_g = _rows_of(general)
        if R_g == 0:
            raise ValueError("option 'general': the general batch is empty")
        device = next(self.model.parameters()).device
        timer = _Timer(device)
        g_ids = _sample_ids(general, R_g, device)
        t_ids = _sample_ids(target, _rows_of(target), device)
        n, m = int(g_ids.max()) + 1, int(t_ids.max()) + 1
        merged = merge_batches(general, target, device)
        merged["sample_index"] = torch.cat([g_ids, t_ids + n])
        R = R_g + t_ids.shape[0]
        if lr is None and self.optimizer is not None:
            lr = float(self.optimizer.param_groups[0]["lr"])

        report = StepReport(blocks=self.blocks)
        cap = self.capture
        with cap, timer("forward"):
            cap.start(R, merged["input_ids"].shape[1])
            loss_sums, counts = loss_fn(self.model, merged)
        _check_loss_shapes(loss_sums, counts, R)
        counts = counts.detach().to(loss_sums.dtype)
        n_i = torch.zeros(n, dtype=counts.dtype, device=device).index_add_(0, g_ids, counts[:R_g])
        n_t = torch.zeros(m, dtype=counts.dtype, device=device).index_add_(0, t_ids, counts[R_g:])
        report.counts = n_i
        report.loss = float(loss_sums[:R_g].detach().sum() / n_i.sum().clamp_min(1))
        report.target_loss = float(loss_sums[R_g:].detach().sum() / n_t.sum().clamp_min(1))
        ds = self._distributed_begin(loss_sums, R_g, n_i, n_t, report)  # None unless data-parallel
        if not (ds.finite if ds is not None else torch.isfinite(loss_sums.detach()).all()):
            cap.reset()
            return _skip(report, "non-finite loss")
        if float(n_t.sum()) <= 0:
            cap.reset()
            raise ValueError("option 'target': the target rows have no loss tokens (all labels are -100)")
        if float(n_i.sum()) <= 0:
            cap.reset()
            raise ValueError("option 'general': the general rows have no loss tokens (all labels are -100)")

        no_grad = self._weights_only and self._needs()[2]  # full_training / target_only weights need no backward
        with timer("backward"):
            if not no_grad:
                cap.backward(loss_sums.sum())
            blocks = cap.blocks if no_grad else cap.collect()

        if ds is None:
            geo = self._geometry(blocks, g_ids, t_ids, n, m, n_i, n_t, R_g, merged, lr, timer, report)
        else:
            geo = ds.geometry(self, blocks, g_ids, t_ids, R_g, merged, lr, timer, report)
        if geo is None:
            cap.reset()
            return _skip(report, "non-finite scores or Gram")
        with timer("solve"):
            coefs = self._coefficients(geo)
            if ds is not None:
                ds.agree(coefs)
        report.weights, report.target_weight = coefs.coef, coefs.target_coef
        report.info.update(coefs.info)
        if not ensure_finite(coefs.coef, coefs.target_coef):
            cap.reset()
            return _skip(report, "non-finite solver output")

        # row coefficients per block: general rows take their sample's coefficient, target rows c_T / N_T
        L = len(blocks)
        cc = coefs.coef if ds is None else ds.local(coefs.coef)  # this rank's samples
        coef = cc.expand(L, n) if cc.shape[0] == 1 else cc
        tcoef = coefs.target_coef.expand(L) if coefs.target_coef.shape[0] == 1 else coefs.target_coef
        n_T = n_t.sum() if ds is None else ds.target_tokens
        row_c = torch.cat([coef[:, g_ids], (tcoef / n_T)[:, None].expand(L, R - R_g)], 1)  # (L, R)
        if self._weights_only:
            cap.reset()
            report.info["row_weights"] = row_c
            report.timings = timer.t
            return report

        if self.assembly == "two_pass":
            cap.reset()
            with timer("assembly"):
                grads = self._second_pass(merged, loss_fn, row_c, coefs.coef.shape[0] == 1)
        else:
            with timer("assembly"):
                grads = {}
                host = row_c.detach().cpu()  # (L, R) one sync: plans which rows each block's GEMM needs
                for l, b in enumerate(blocks):
                    grads.update(assemble(b, row_c[l], host[l]))
            cap.reset()
        if ds is not None:
            with timer("all_reduce"):
                grads = ds.reduce_grads(grads, [p for b in cap.blocks for p in b.params])
        if not ensure_finite(*grads.values()):
            return _skip(report, "non-finite update")
        fresh = self.assembly == "one_pass"  # assembled tensors are new and owned here: no defensive copy
        for p, g in grads.items():
            same = g.dtype == p.dtype
            g = g.to(p.dtype)
            if p.grad is None:
                p.grad = g.contiguous() if (fresh or not same) else g.clone()
            else:
                p.grad.add_(g)
        report.timings = timer.t
        return report

    # ------------------------------------------------------------------ internals
    def _distributed_begin(self, loss_sums, R_g, n_i, n_t, report):
        """Data parallelism hook (integrations/distributed.py): the global counts and losses, or None."""
        if self.process_group is None:
            return None
        from drpost.integrations.distributed import DistributedStep, resolve_process_group

        group = resolve_process_group(self.process_group)
        return None if group is None else DistributedStep.begin(group, loss_sums, R_g, n_i, n_t, report)

    def _needs(self):
        fs = self.feasible
        need_gram = fs.needs_gram or self.slack is not None
        need_tgram = fs.needs_target_gram or self.slack == "auto"
        trivial = fs.name in ("full_training", "target_only") and not self.report_scores and self.slack is None
        return need_gram, need_tgram, trivial

    def _method_for(self, b_idx, block, n_rows, m_rows, T, need_gram) -> str:
        if self.scoring != "auto":
            return self.scoring
        key = (b_idx, n_rows, m_rows, T, need_gram)
        if key not in self._choice:  # re-decided whenever the shapes change
            self._choice[key] = cost.choose(block, n_rows, m_rows, T, need_gram, self.rates)
        return self._choice[key]

    def _tune(self, key, b, l, tc, R_g, need_gram, need_tgram):
        """Autotune: run each exact candidate once on this block, keep the fastest (cached per shape key)."""
        cands = ["full_ghost", "direct"] + ([] if (need_gram or need_tgram) else ["reduced_ghost"])
        best, best_t, best_st = None, math.inf, None
        cuda = tc.device.type == "cuda"
        for meth in cands:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            st = block_stats(b, l, meth, tc, R_g, need_gram, need_tgram, self.sketcher,
                             need_target_sketch=need_tgram)
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if dt < best_t:
                best, best_t, best_st = meth, dt, st
        self._choice[key] = best
        return best, best_st

    def _geometry(self, blocks, g_ids, t_ids, n, m, n_i, n_t, R_g, merged, lr, timer, report):
        need_gram, need_tgram, trivial = self._needs()
        L = len(blocks)
        dev = n_i.device
        if trivial:
            z = torch.zeros(L, n, dtype=n_i.dtype, device=dev)
            return StepGeometry(self.blocks, z, torch.zeros(L, dtype=z.dtype, device=dev), n_i, n_t, lr=lr)
        R = merged["input_ids"].shape[0]
        T = merged["input_ids"].shape[1]
        tc = torch.zeros(R, dtype=n_t.dtype, device=dev)
        tc[R_g:] = 1.0 / n_t.sum()
        S_g = _indicator(g_ids, n, n_i.dtype)  # (n, R_g)
        S_t = _indicator(t_ids, m, n_i.dtype)  # (m, R_t)
        scores, tsq, grams, tgrams, sketches = [], [], [], [], []
        with timer("scoring"):
            for l, b in enumerate(blocks):
                st = None
                key = (l, R_g, R - R_g, T, need_gram or need_tgram)
                if self.autotune and self.scoring == "auto" and key not in self._choice and b.factored:
                    meth, st = self._tune(key, b, l, tc, R_g, need_gram, need_tgram)
                else:
                    meth = self._method_for(l, b, R_g, R - R_g, T, need_gram or need_tgram)
                report.scoring[b.name] = meth
                if st is None:
                    st = block_stats(b, l, meth, tc, R_g, need_gram, need_tgram, self.sketcher,
                                     need_target_sketch=need_tgram)
                dt = st.row_scores.dtype
                scores.append(S_g.to(dt) @ st.row_scores)
                tsq.append(st.target_sq)
                if need_gram:
                    grams.append(S_g.to(dt) @ st.row_gram @ S_g.to(dt).t())
                if need_tgram:
                    tgrams.append(S_t.to(dt) @ st.target_row_gram @ S_t.to(dt).t())
                    sketches.append((S_t.to(dt) @ st.target_row_sketch) / n_t.to(dt)[:, None])
        return finish_geometry(self.blocks, torch.stack(scores), tsq, grams, tgrams, sketches, n_i, n_t,
                               need_gram, need_tgram, lr, report)

    def _coefficients(self, geo: StepGeometry) -> Coefficients:
        coefs = self.feasible(geo)
        from drpost.feasible.base import fallback_full_training, solver_failure

        failure = solver_failure(coefs.info, getattr(self.feasible, "max_iter", None))
        if failure is not None:  # an unconverged solve is not trusted: standard training for this step, no slack
            return fallback_full_training(geo, failure)
        if self.slack is None:
            return coefs
        from drpost.feasible.convex import apply_slack

        scoped = geo.summed() if self.feasible.scope == "global" else geo
        if self.slack == "auto":
            radius = self._slack_strength(scoped)
            r_val, info = (radius if isinstance(radius, tuple) else (radius, {}))
            out = apply_slack(scoped, coefs, r_val)
            out.info.update({"slack_" + k: v for k, v in info.items()})
            return out
        return apply_slack(scoped, coefs, float(self.slack))

    def _second_pass(self, merged: dict, loss_fn, row_c: Tensor, shared: bool) -> dict:
        """Reference assembly: ordinary forward/backward of sum_r c_r loss_r (one backward per block if layer)."""
        params = [p for b in self.capture.blocks for p in b.params]
        if shared:  # one weight vector for every block: run only the rows that carry weight
            keep = torch.nonzero(row_c[0] != 0).flatten()
            if keep.numel() == 0:
                return {p: torch.zeros_like(p) for p in params}
            batch, c = take_rows(merged, keep), row_c[0, keep]
            loss_sums, _ = loss_fn(self.model, batch)
            gs = torch.autograd.grad((loss_sums * c.to(loss_sums.dtype)).sum(), params, allow_unused=True)
            return {p: (torch.zeros_like(p) if g is None else g) for p, g in zip(params, gs, strict=True)}
        loss_sums, _ = loss_fn(self.model, merged)
        out = {}
        for l, b in enumerate(self.capture.blocks):
            gs = torch.autograd.grad((loss_sums * row_c[l].to(loss_sums.dtype)).sum(), b.params,
                                     retain_graph=True, allow_unused=True)
            for p, g in zip(b.params, gs, strict=True):
                out[p] = torch.zeros_like(p) if g is None else g
        return out


def finish_geometry(names, scores: Tensor, tsq, grams, tgrams, sketches, counts: Tensor, tcounts: Tensor,
                    need_gram: bool, need_tgram: bool, lr, report: StepReport) -> StepGeometry | None:
    """Stack per-block quantities into a ``StepGeometry`` (scores (L, n)), record the scores in the report, and
    return None when anything is non-finite (the step is then skipped)."""
    dt = scores.dtype
    geo = StepGeometry(
        block_names=names,
        scores=scores,
        target_sq=torch.stack(tsq).to(dt),
        counts=counts.to(dt),
        target_counts=tcounts.to(dt),
        gram=torch.stack(grams) if need_gram else None,
        target_gram=torch.stack(tgrams) if need_tgram else None,
        target_sketch=_pad_stack(sketches) if need_tgram else None,
        lr=lr,
    )
    report.block_scores = geo.scores
    report.scores = geo.scores.sum(0)
    if not ensure_finite(geo.scores, geo.target_sq, geo.gram, geo.target_gram):
        return None
    return geo


def _pad_stack(xs: list[Tensor]) -> Tensor:
    """Stack (m, D_l) sketches of different widths into (L, m, D_max) with zero padding (inner products kept)."""
    D = max(x.shape[1] for x in xs)
    return torch.stack([torch.nn.functional.pad(x, (0, D - x.shape[1])) for x in xs])


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
