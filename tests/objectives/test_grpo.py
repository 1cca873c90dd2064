"""GRPO per-row loss: a hand-worked token case (clipped ratio + k3 KL), rows against an independent per-row
computation, each row alone = its row in the batch, sum over rows = the standard token-sum objective, the
rewards/group_size path, seq-mean aggregation, and the on-policy gradient."""

from __future__ import annotations

import math

import pytest
import torch

from drpost.objectives.advantages import group_advantages
from drpost.objectives.grpo import group_sample_index, grpo_loss_fn, grpo_token_losses
from drpost.objectives.logprobs import reference_token_logps

G, K = 2, 3


def test_grpo_token_losses_hand_worked():
    """eps_low 0.2, eps_high 0.28 (DAPO-style), kl_coef 0.1, sequence advantage A = 2 on a 2-token response:
    t1: logp -1, old -1.5 -> ratio e^0.5 = 1.6487 -> clipped to 1.28 -> pg = max(-3.2974, -2.56) = -2.56
        ref -1.5: d = ref - logp = -0.5, k3 = e^-0.5 + 0.5 - 1 = 0.106531
    t2: logp -2, old -2 -> ratio 1 -> pg = -2; ref -2 -> k3 = 0
    loss = (-2.56 + 0.0106531, -2)."""
    logps = torch.tensor([[0.0, -1.0, -2.0]])
    old = torch.tensor([[0.0, -1.5, -2.0]])
    ref = torch.tensor([[0.0, -1.5, -2.0]])
    mask = torch.tensor([[0, 1, 1]])
    t = grpo_token_losses(logps, old, torch.tensor([2.0]), mask, 0.2, 0.28, ref_logps=ref, kl_coef=0.1)
    k3 = math.exp(-0.5) - 0.5
    torch.testing.assert_close(t["pg"], torch.tensor([[0.0, -2.56, -2.0]]))
    torch.testing.assert_close(t["kl"], torch.tensor([[0.0, k3, 0.0]]))
    torch.testing.assert_close(t["loss"], torch.tensor([[0.0, -2.56 + 0.1 * k3, -2.0]]))
    torch.testing.assert_close(t["clipped"], torch.tensor([[0.0, 1.0, 0.0]]))


@pytest.fixture
def setup(U):
    policy, ref = U.tiny_lm(0), U.tiny_lm(2)
    rows = U.rows(G * K, seed=21)  # rows 0-2: prompt group 0, rows 3-5: group 1 (prompts differ; fine here)
    batch = U.collate(rows, sample_index=group_sample_index(G, K).tolist())
    R, T = batch["input_ids"].shape
    m = (batch["labels"] != U.IGNORE).double()
    m[:, 0] = 0
    gen = torch.Generator().manual_seed(4)
    batch["rewards"] = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    batch["advantages"] = group_advantages(batch["rewards"], K)
    batch["old_logps"] = (reference_token_logps(policy, batch) + 0.3 * torch.randn(R, T, generator=gen)) * m
    batch["ref_logps"] = reference_token_logps(ref, batch)
    return policy, rows, batch, m


def _manual_rows(U, policy, rows, batch, clip=0.2, kl_coef=0.05):
    out = []
    for i, row in enumerate(rows):
        lp = U.manual_logps(policy, row)
        a = batch["advantages"][i]
        total = 0.0
        for t in range(1, len(row["input_ids"])):
            if row["labels"][t] == U.IGNORE:
                continue
            r = torch.exp(lp[t] - batch["old_logps"][i, t])
            d = batch["ref_logps"][i, t] - lp[t]
            total = total + torch.maximum(-a * r, -a * r.clamp(1 - clip, 1 + clip)) + kl_coef * (torch.exp(d) - d - 1)
        out.append(total)
    return torch.stack(out)


def test_rows_match_independent_computation(U, setup):
    policy, rows, batch, m = setup
    loss_fn = grpo_loss_fn(clip_range=0.2, kl_coef=0.05)
    out, counts = loss_fn(policy, batch)
    torch.testing.assert_close(out, _manual_rows(U, policy, rows, batch))
    torch.testing.assert_close(counts, m.sum(-1))
    assert {"pg_loss", "kl", "clipfrac", "ratio"} <= set(loss_fn.stats)


def test_each_row_alone_matches_the_batch(U, setup):
    policy, rows, batch, m = setup
    loss_fn = grpo_loss_fn(kl_coef=0.05)
    out, counts = loss_fn(policy, batch)
    for i in range(len(rows)):
        o, c = loss_fn(policy, U.trim(batch, i, keys_rt=("old_logps", "ref_logps"), keys_r=("advantages",)))
        torch.testing.assert_close(o[0], out[i])
        torch.testing.assert_close(c[0], counts[i])


def test_sum_over_rows_is_the_standard_objective(U, setup):
    policy, rows, batch, m = setup
    out, counts = grpo_loss_fn(kl_coef=0.05)(policy, batch)
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    on = m[:, 1:].bool()
    a = batch["advantages"][:, None].expand_as(lp)[on]
    lp, old, ref = lp[on], batch["old_logps"][:, 1:][on], batch["ref_logps"][:, 1:][on]
    r = torch.exp(lp - old)
    std = (torch.maximum(-a * r, -a * r.clamp(0.8, 1.2)) + 0.05 * (torch.exp(ref - lp) - (ref - lp) - 1)).sum()
    torch.testing.assert_close(out.sum(), std)
    torch.testing.assert_close(out.sum() / counts.sum(), std / on.sum())


def test_rewards_path_seq_mean_and_sample_index(U, setup):
    policy, rows, batch, m = setup
    out, _ = grpo_loss_fn()(policy, batch)
    no_adv = {k: v for k, v in batch.items() if k != "advantages"}
    out2, _ = grpo_loss_fn(group_size=K)(policy, no_adv)
    torch.testing.assert_close(out2, out)
    with pytest.raises(KeyError):
        grpo_loss_fn()(policy, no_adv)
    out3, c3 = grpo_loss_fn(loss_agg="seq_mean")(policy, batch)
    torch.testing.assert_close(out3, out / m.sum(-1))
    torch.testing.assert_close(c3, torch.ones(G * K))
    no_si = {k: v for k, v in batch.items() if k != "sample_index"}  # rows or groups: same per-row losses
    torch.testing.assert_close(grpo_loss_fn()(policy, no_si)[0], out)
    torch.testing.assert_close(group_sample_index(2, 3), torch.tensor([0, 0, 0, 1, 1, 1]))


def test_on_policy_gradient_and_kl_at_reference(U, setup):
    """Without old_logps the ratio is 1: gradient = -sum A grad logp. With ref = current policy, k3 and its gradient
    vanish."""
    policy, rows, batch, m = setup
    b = {k: v for k, v in batch.items() if k != "old_logps"}
    b["ref_logps"] = reference_token_logps(policy, b)
    params = list(policy.parameters())
    out, _ = grpo_loss_fn(kl_coef=1.0)(policy, b)
    g1 = torch.autograd.grad(out.sum(), params, allow_unused=True)
    pg = -sum(batch["advantages"][i] * U.manual_logps(policy, r).sum() for i, r in enumerate(rows))
    g2 = torch.autograd.grad(pg, params, allow_unused=True)
    for a, c in zip(g1, g2):
        if a is None or c is None:
            continue
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)  # float32 internals of transformers 5 (tests/helpers.py)
    with pytest.raises(KeyError):
        grpo_loss_fn(kl_coef=0.1)(policy, {k: v for k, v in b.items() if k != "ref_logps"})
