"""PPO per-row loss and the value head: hand-worked clipping cases, rows against an independent per-row computation,
each row alone (batch of one) = its row in the batch, sum over rows = the standard summed objective, and the
on-policy gradient = the token policy gradient."""

from __future__ import annotations

import math

import pytest
import torch

from drpost.objectives.logprobs import reference_token_logps
from drpost.objectives.ppo import PolicyWithValue, ValueHead, ppo_loss_fn, ppo_token_losses
from drpost.objectives.rl_target import rl_target_loss_fn

KEYS_RT = ("old_logps", "advantages", "returns", "old_values")


def test_ppo_token_losses_hand_worked():
    """eps = 0.2, eps_v = 0.2, vf_coef = 0.5, one row of 3 response tokens (+ one unmasked):
    t0: ratio 1.5, A=+1 -> max(-1.5, -1.2) = -1.2 (clipped);   V=1.0, V_old=0.5, G=0: max(1, 0.7^2)/2 = 0.5
    t1: ratio 0.5, A=+1 -> max(-0.5, -0.8) = -0.5 (unclipped); V=0.6, V_old=0.5, G=1: max(.16, .16)/2 = 0.08
    t2: ratio 0.5, A=-1 -> max( 0.5,  0.8) =  0.8 (clipped);   V=0.0, V_old=0.5, G=0: max(0, 0.3^2)/2 = 0.045
    """
    logps = torch.log(torch.tensor([[1.5, 0.5, 0.5, 3.0]]))
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, 7.0]])
    values = torch.tensor([[1.0, 0.6, 0.0, 2.0]])
    old_values = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    returns = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    t = ppo_token_losses(logps, old, adv, mask, 0.2, values, old_values, returns, 0.2, vf_coef=0.5)
    torch.testing.assert_close(t["pg"], torch.tensor([[-1.2, -0.5, 0.8, 0.0]]))
    torch.testing.assert_close(t["vf"], torch.tensor([[0.5, 0.08, 0.045, 0.0]]))
    torch.testing.assert_close(t["clipped"], torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(t["loss"], t["pg"] + 0.5 * t["vf"])
    t2 = ppo_token_losses(logps, old, adv, mask, 0.2, values, old_values, returns, None, vf_coef=0.5)
    torch.testing.assert_close(t2["vf"], torch.tensor([[0.5, 0.08, 0.0, 0.0]]))


@pytest.fixture
def setup(U):
    torch.manual_seed(7)
    model = PolicyWithValue(U.tiny_lm(0))
    rows = U.rows(5, seed=11)
    batch = U.collate(rows)
    R, T = batch["input_ids"].shape
    g = torch.Generator().manual_seed(1)
    resp = batch["labels"] != U.IGNORE
    resp[:, 0] = False
    m = resp.double()
    batch["old_logps"] = (reference_token_logps(model, batch) + 0.3 * torch.randn(R, T, generator=g)) * m
    batch["advantages"] = torch.randn(R, T, generator=g) * m
    batch["returns"] = torch.randn(R, T, generator=g) * m
    batch["old_values"] = torch.randn(R, T, generator=g) * 0.1 * m
    return model, rows, batch, m


def test_policy_with_value_shapes_and_head(U, setup):
    model, rows, batch, m = setup
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    R, T = batch["input_ids"].shape
    assert out.logits.shape == (R, T, U.VOCAB) and out.values.shape == (R, T)
    hid = model.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(out.values, hid @ model.value_head.summary.weight[0] + model.value_head.summary.bias)
    assert isinstance(model.value_head, ValueHead)
    assert any(mod is model.value_head.summary for mod in model.modules())  # hooks can see the head's Linear
    assert model.value_head.summary.weight.dtype == torch.float64


def _manual_rows(U, model, rows, batch, clip=0.2, clip_v=0.2, vf_coef=0.1):
    """Independent per-row PPO loss: each row alone, log-probs by hand, V before token t read at position t-1."""
    out = []
    for i, row in enumerate(rows):
        L = len(row["input_ids"])
        ids = torch.tensor(row["input_ids"])[None]
        lp = U.manual_logps(model.policy, row)
        values = model(input_ids=ids).values[0]  # (L,) read after each token
        total = 0.0
        for t in range(1, L):
            if row["labels"][t] == -100:
                continue
            ratio = torch.exp(lp[t] - batch["old_logps"][i, t])
            a = batch["advantages"][i, t]
            pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip))
            v, vo, G = values[t - 1], batch["old_values"][i, t], batch["returns"][i, t]
            vc = vo + (v - vo).clamp(-clip_v, clip_v)
            vf = 0.5 * torch.maximum((v - G) ** 2, (vc - G) ** 2)
            total = total + pg + vf_coef * vf
        out.append(total)
    return torch.stack(out)


def test_rows_match_independent_computation(U, setup):
    model, rows, batch, m = setup
    loss_fn = ppo_loss_fn(clip_range=0.2, clip_range_value=0.2, vf_coef=0.1)
    out, counts = loss_fn(model, batch)
    torch.testing.assert_close(out, _manual_rows(U, model, rows, batch))
    torch.testing.assert_close(counts, m.sum(-1))
    assert 0 < loss_fn.stats["clipfrac"] < 1  # the noisy old log-probs make some tokens clip
    assert {"pg_loss", "vf_loss", "approx_kl", "ratio"} <= set(loss_fn.stats)


def test_each_row_alone_matches_the_batch(U, setup):
    model, rows, batch, m = setup
    loss_fn = ppo_loss_fn(vf_coef=0.5, ent_coef=0.01)
    out, counts = loss_fn(model, batch)
    for i in range(len(rows)):
        o, c = loss_fn(model, U.trim(batch, i, keys_rt=KEYS_RT))
        torch.testing.assert_close(o[0], out[i])
        torch.testing.assert_close(c[0], counts[i])


def test_sum_over_rows_is_the_standard_objective(setup):
    """Flat standard PPO objective over all response tokens of the batch (summed; the token mean divides by N)."""
    model, rows, batch, m = setup
    out, counts = ppo_loss_fn(vf_coef=0.1)(model, batch)
    f = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logp_all = torch.log_softmax(f.logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    on = m[:, 1:].bool()
    lp, old, a = logp_all[on], batch["old_logps"][:, 1:][on], batch["advantages"][:, 1:][on]
    v, vo, G = f.values[:, :-1][on], batch["old_values"][:, 1:][on], batch["returns"][:, 1:][on]
    r = torch.exp(lp - old)
    pg = torch.maximum(-a * r, -a * r.clamp(0.8, 1.2))
    vf = 0.5 * torch.maximum((v - G) ** 2, (vo + (v - vo).clamp(-0.2, 0.2) - G) ** 2)
    std = (pg + 0.1 * vf).sum()
    torch.testing.assert_close(out.sum(), std)
    torch.testing.assert_close(out.sum() / counts.sum(), std / on.sum())


def test_on_policy_gradient_equals_token_policy_gradient(setup):
    """At ratio 1 (old = current log-probs) the clipped surrogate's gradient is -sum A grad logp (token_pg)."""
    model, rows, batch, m = setup
    b = dict(batch, old_logps=reference_token_logps(model, batch))
    params = [p for p in model.policy.parameters()]
    ppo_rows, _ = ppo_loss_fn(vf_coef=0.0)(model, b)
    pg_rows, pg_counts = rl_target_loss_fn("token_pg")(model.policy, b)
    g1 = torch.autograd.grad(ppo_rows.sum(), params, allow_unused=True)
    g2 = torch.autograd.grad(pg_rows.sum(), params, allow_unused=True)
    for a, c in zip(g1, g2):
        if a is None or c is None:
            assert a is None and c is None
            continue
        torch.testing.assert_close(a, c)


def test_vf_needs_values(U, setup):
    model, rows, batch, m = setup
    with pytest.raises(ValueError):
        ppo_loss_fn(vf_coef=0.1)(model.policy, batch)
    out, _ = ppo_loss_fn(vf_coef=0.0)(model.policy, batch)  # a plain LM works without a value loss
    assert torch.isfinite(out).all() and not math.isnan(out.sum().item())
