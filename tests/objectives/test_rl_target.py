"""RL target objectives (reward, token_pg, train_loss) against hand formulas, per-row independence, and the
factory."""

from __future__ import annotations

import math

import pytest
import torch

from drpost.objectives.logprobs import reference_token_logps
from drpost.objectives.ppo import PolicyWithValue, PPOLoss
from drpost.objectives.rl_target import normalize_rewards, rl_target_loss_fn


@pytest.fixture
def setup(U):
    policy = U.tiny_lm(0)
    rows = U.rows(4, seed=31)
    batch = U.collate(rows)
    batch["rewards"] = torch.tensor([2.0, -1.0, 0.5, 0.5])
    return policy, rows, batch


def test_normalize_rewards_hand():
    """(2, -1, 0.5, 0.5): mean 0.5, deviations (1.5, -1.5, 0, 0), unbiased var 4.5/3 = 1.5."""
    r = torch.tensor([2.0, -1.0, 0.5, 0.5])
    s = math.sqrt(1.5)
    torch.testing.assert_close(normalize_rewards(r, "batch", eps=0.0), torch.tensor([1.5 / s, -1.5 / s, 0, 0]))
    torch.testing.assert_close(normalize_rewards(r, "group", group_size=2, eps=0.0),
                               torch.tensor([1 / math.sqrt(2), -1 / math.sqrt(2), 0, 0]))
    torch.testing.assert_close(normalize_rewards(r, "none"), r)


def test_reward_objective_matches_hand_formula(U, setup):
    policy, rows, batch = setup
    out, counts = rl_target_loss_fn("reward")(policy, batch)
    rn = normalize_rewards(batch["rewards"], "batch")
    manual = torch.stack([-U.manual_logps(policy, r).sum() * rn[i] for i, r in enumerate(rows)])
    torch.testing.assert_close(out, manual)
    torch.testing.assert_close(counts, torch.ones(4))
    out_t, counts_t = rl_target_loss_fn("reward", per="token")(policy, batch)
    torch.testing.assert_close(out_t, out)
    torch.testing.assert_close(counts_t, (batch["labels"][:, 1:] != U.IGNORE).double().sum(-1))
    # with rewards normalized beforehand ("none"), every row alone gives its row of the batch
    b = dict(batch, rewards=rn)
    full, _ = rl_target_loss_fn("reward", normalize="none")(policy, b)
    for i in range(4):
        o, _ = rl_target_loss_fn("reward", normalize="none")(policy, U.trim(b, i, keys_r=("rewards",)))
        torch.testing.assert_close(o[0], full[i])


def test_token_pg_matches_hand_formula(U, setup):
    policy, rows, batch = setup
    R, T = batch["input_ids"].shape
    adv = torch.randn(R, T, generator=torch.Generator().manual_seed(0))
    out, counts = rl_target_loss_fn("token-pg")(policy, dict(batch, advantages=adv))
    manual = torch.stack([-(U.manual_logps(policy, r) * adv[i, : len(r["input_ids"])]).sum()
                          for i, r in enumerate(rows)])
    torch.testing.assert_close(out, manual)
    torch.testing.assert_close(counts, (batch["labels"][:, 1:] != U.IGNORE).double().sum(-1))
    seq = torch.tensor([1.0, -2.0, 0.0, 3.0])  # (R,) sequence advantages broadcast
    out_s, _ = rl_target_loss_fn("token_pg")(policy, dict(batch, advantages=seq))
    manual_s = torch.stack([-U.manual_logps(policy, r).sum() * seq[i] for i, r in enumerate(rows)])
    torch.testing.assert_close(out_s, manual_s)


def test_train_loss_is_the_ppo_loss(U, setup):
    policy, rows, batch = setup
    torch.manual_seed(3)
    model = PolicyWithValue(policy)
    m = (batch["labels"] != U.IGNORE).double()
    m[:, 0] = 0
    g = torch.Generator().manual_seed(2)
    b = dict(batch, old_logps=reference_token_logps(model, batch), advantages=torch.randn(m.shape, generator=g) * m,
             returns=torch.randn(m.shape, generator=g) * m, old_values=torch.zeros_like(m))
    fn = rl_target_loss_fn("train_loss", vf_coef=0.2)
    assert isinstance(fn, PPOLoss)
    torch.testing.assert_close(fn(model, b)[0], PPOLoss(vf_coef=0.2)(model, b)[0])


def test_factory_rejects_unknown():
    with pytest.raises(ValueError):
        rl_target_loss_fn("kl")
    with pytest.raises(TypeError):
        rl_target_loss_fn("token_pg", beta=1.0)
    with pytest.raises(ValueError):
        rl_target_loss_fn("reward", normalize="group")
