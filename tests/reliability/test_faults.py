"""Numerical faults: a NaN/Inf in the loss, the Gram or the solver output skips the step with the parameters AND the
optimizer state untouched (the LR schedule still advances), is counted, and training continues; an unconverged
solver falls back to full_training for that step; degenerate geometry (duplicated samples, zero target gradient)
gives finite updates for hull, gem and ball(auto)."""

from __future__ import annotations

import random

import pytest
import torch

from drpost.feasible.base import solver_failure
from drpost.geometry import step_geometry
from drpost.objectives.sft import causal_lm_loss
from drpost.step import DataRegularizer
from drpost.trainers.sft import GeneralSampler, LoopParts, LoopState, MethodSpec, new_metrics, sft_steps
from tests.helpers import batch, tiny_model

STEPS, FAULT = 4, 2  # the fault hits the third step


def _rows(n: int, seed: int) -> list[dict]:
    b = batch(n, T=8, seed=seed)
    return [{"input_ids": b["input_ids"][i][b["attention_mask"][i] == 1].tolist(),
             "labels": b["labels"][i][b["attention_mask"][i] == 1].tolist()} for i in range(n)]


def _parts(method: str = "hull", loss_fn=causal_lm_loss, **options) -> LoopParts:
    model = tiny_model("llama")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    reg = DataRegularizer(model, method=method, optimizer=opt, **options)
    rng = random.Random(0)
    g_rows, t_rows = _rows(12, 1), _rows(4, 2)
    return LoopParts(model, reg, opt, sched, params, GeneralSampler(MethodSpec("m"), 12, 4, 4, rng), g_rows, t_rows,
                     [None] * 12, loss_fn, 0, 1, 1.0)


def _snapshot(parts: LoopParts):
    opt = parts.opt.state_dict()
    return ([p.detach().clone() for p in parts.params],
            {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()} for k, s in opt["state"].items()})


def _same(a, b) -> bool:
    pa, sa = a
    pb, sb = b
    return all(torch.equal(x, y) for x, y in zip(pa, pb)) and sa.keys() == sb.keys() and all(
        all(torch.equal(sa[k][n], sb[k][n]) if torch.is_tensor(sa[k][n]) else sa[k][n] == sb[k][n] for n in sa[k])
        for k in sa)


def _train_with_fault(parts: LoopParts) -> tuple[dict, list]:
    snaps = [_snapshot(parts)]
    state = LoopState(0, parts.sampler.rng, new_metrics())
    sft_steps(parts, state, STEPS, on_step=lambda st, report: snaps.append(_snapshot(parts)))
    assert state.step == STEPS and parts.sched.last_epoch == STEPS  # the schedule advanced on the skipped step too
    return state.metrics, snaps


def _check_skipped_once(metrics: dict, snaps: list, reason: str) -> None:
    assert metrics["skipped_steps"] == 1 and metrics["skip_reasons"] == {reason: 1}
    assert len(metrics["train_loss"]) == STEPS - 1
    for k in range(STEPS):
        assert _same(snaps[k], snaps[k + 1]) == (k == FAULT), k  # untouched exactly on the faulty step


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_skips_one_step(bad):
    calls = {"n": 0}

    def faulty_loss(model, b):
        loss, counts = causal_lm_loss(model, b)
        calls["n"] += 1
        return (loss * bad if calls["n"] == FAULT + 1 else loss), counts

    metrics, snaps = _train_with_fault(_parts(loss_fn=faulty_loss))
    _check_skipped_once(metrics, snaps, "non-finite loss")


def test_non_finite_gram_skips_one_step(monkeypatch):
    parts = _parts()
    real, real_products, calls = step_geometry.block_stats, step_geometry.row_products, {"step": -1}
    n_blocks = len(parts.reg.blocks)  # each block is scored once per step, by one of the two paths

    def faulty(*args, **kw):
        calls["step"] += 1
        st = real(*args, **kw)
        if calls["step"] // n_blocks == FAULT and st.row_gram is not None:
            st.row_gram = st.row_gram * float("nan")
        return st

    def faulty_products(block, n_rows, tc, full, **kw):  # the batched path: row products, the Gram among them
        calls["step"] += 1
        P, kept = real_products(block, n_rows, tc, full, **kw)
        if calls["step"] // n_blocks == FAULT and full:
            P = P * float("nan")
        return P, kept

    monkeypatch.setattr(step_geometry, "block_stats", faulty)
    monkeypatch.setattr(step_geometry, "row_products", faulty_products)
    metrics, snaps = _train_with_fault(parts)
    _check_skipped_once(metrics, snaps, "non-finite scores or Gram")


def test_non_finite_solver_output_skips_one_step(monkeypatch):
    parts = _parts()
    fs, calls = parts.reg.feasible, {"n": 0}
    real = fs.coefficients

    def faulty(geo):
        out = real(geo)
        calls["n"] += 1
        if calls["n"] == FAULT + 1:
            out.coef = out.coef * float("nan")
        return out

    monkeypatch.setattr(fs, "coefficients", faulty)
    metrics, snaps = _train_with_fault(parts)
    _check_skipped_once(metrics, snaps, "non-finite solver output")


# ------------------------------------------------------------------------------------------------ solver fallback
def test_solver_failure_rule():
    assert solver_failure({"iterations": 3, "kkt_residual": torch.tensor([1.0])}, 10) is None  # stopped early
    assert solver_failure({"iterations": 10, "kkt_residual": torch.tensor([1e-9])}, 10) is None  # converged
    assert "did not converge" in solver_failure({"iterations": 10, "kkt_residual": torch.tensor([1.0])}, 10)
    assert solver_failure({"iterations": 10, "kkt_residual": torch.tensor([float("nan")])}, 10) is not None
    assert solver_failure({"iterations": 0}, None) is None  # closed-form sets


def _unconverged(fs):
    """Make a convex set report an exhausted iteration budget with a large KKT residual (its solution kept)."""
    fs = getattr(fs, "inner", fs)  # the set itself when slack wraps it
    real = fs.coefficients

    def coefficients(geo):
        out = real(geo)
        out.info.update(iterations=fs.max_iter, kkt_residual=torch.full_like(out.info["kkt_residual"], 0.5))
        return out

    fs.coefficients = coefficients


def test_unconverged_solver_falls_back_to_full_training():
    """A solve that used its whole budget with KKT residual 0.5 is not trusted: the step is full_training's."""
    model = tiny_model("llama")
    g, t = batch(6, T=8, seed=3), batch(1, T=8, seed=4)
    grads = {}
    for method in ("hull", "full_training"):
        reg = DataRegularizer(model, method=method, slack="auto" if method == "hull" else None)
        if method == "hull":
            _unconverged(reg.feasible)
        model.zero_grad(set_to_none=True)
        report = reg.step(general=g, target=t, loss_fn=causal_lm_loss)
        assert not report.skipped
        grads[method] = [p.grad.clone() for p in model.parameters()]
        if method == "hull":
            assert report.info["solver_fallback"] and "did not converge" in report.info["solver_fallback_reason"]
            assert torch.allclose(report.weights, torch.full_like(report.weights, 1 / float(report.counts.sum())))
            assert float(report.target_weight.abs().max()) == 0.0  # no slack on a fallback step
    # full_training runs one plain backward, the fallback assembles from captured factors: the same update up to
    # the float32 rounding inside HF's RMSNorm (it computes in float32 even in a float64 model)
    for a, b in zip(grads["hull"], grads["full_training"]):
        assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max())


def test_fallbacks_are_counted_by_the_loop():
    parts = _parts("hull")
    _unconverged(parts.reg.feasible)
    state = LoopState(0, parts.sampler.rng, new_metrics())
    sft_steps(parts, state, 3)
    assert state.metrics["solver_fallbacks"] == 3 and state.metrics["skipped_steps"] == 0
    assert len(state.metrics["train_loss"]) == 3


# ------------------------------------------------------------------------------------------- degenerate geometry
def _zero_target_loss(n_general: int):
    def loss_fn(model, b):
        loss, counts = causal_lm_loss(model, b)
        keep = torch.ones_like(loss)
        keep[n_general:] = 0.0
        return loss * keep, counts  # the target rows' gradient is exactly zero

    return loss_fn


@pytest.mark.parametrize("method,opts", [("hull", {}), ("gem", {}), ("ball", {"radius": "auto"}),
                                         ("hull", {"slack": "auto", "scope": "layer"}), ("cone", {}),
                                         ("capped_simplex", {"k": 2}), ("span", {}), ("halfspace", {})])
@pytest.mark.parametrize("case", ["duplicated", "zero_target", "both"])
def test_degenerate_geometry_gives_finite_updates(method, opts, case):
    model = tiny_model("llama")
    g = batch(4, T=8, seed=5)
    if case in ("duplicated", "both"):  # four copies of one sample: a rank-one Gram
        g = {k: v[[0, 0, 0, 0]] for k, v in g.items()}
    t = batch(1, T=8, seed=6)
    loss_fn = _zero_target_loss(4) if case in ("zero_target", "both") else causal_lm_loss
    reg = DataRegularizer(model, method=method, **opts)
    for _ in range(2):  # the second step exercises running estimates
        model.zero_grad(set_to_none=True)
        report = reg.step(general=g, target=t, loss_fn=loss_fn)
        assert not report.skipped, report.skip_reason
        assert torch.isfinite(report.weights).all() and torch.isfinite(report.target_weight).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
