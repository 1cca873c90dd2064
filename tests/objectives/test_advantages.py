"""GAE, whitening, group advantages, KL-penalized rewards and KL controllers against hand-worked numbers and plain
reference loops."""

from __future__ import annotations

import math

import pytest
import torch

from drpost.objectives.advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    group_advantages,
    kl_penalized_rewards,
    whiten,
)


def test_gae_hand_worked_three_tokens():
    """gamma = 0.9, lam = 0.8, rewards (0, 0, 1), values (0.5, 0.4, 0.3), then one padded position (ignored).

    delta_2 = 1 + 0.9*0   - 0.3 =  0.7         A_2 = 0.7
    delta_1 = 0 + 0.9*0.3 - 0.4 = -0.13        A_1 = -0.13 + 0.72*0.7   =  0.374
    delta_0 = 0 + 0.9*0.4 - 0.5 = -0.14        A_0 = -0.14 + 0.72*0.374 =  0.12928
    returns = A + V = (0.62928, 0.774, 1.0); the padded position gets 0 in both.
    """
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.12928, 0.374, 0.7, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.62928, 0.774, 1.0, 0.0]]))


def _gae_reference(rewards, values, mask, gamma, lam):
    """Plain per-row reverse loop over the row's response positions (listed explicitly)."""
    adv = torch.zeros_like(values)
    for b in range(rewards.shape[0]):
        pos = [t for t in range(rewards.shape[1]) if mask[b, t]]
        last = 0.0
        for j in range(len(pos) - 1, -1, -1):
            t = pos[j]
            v_next = values[b, pos[j + 1]].item() if j + 1 < len(pos) else 0.0
            delta = rewards[b, t].item() + gamma * v_next - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0), (0.7, 0.0)])
def test_gae_matches_reverse_loop_on_random_inputs(gamma, lam):
    g = torch.Generator().manual_seed(3)
    B, T = 6, 11
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):  # a prompt offset, a response block, right padding
        start = int(torch.randint(0, 4, (1,), generator=g))
        length = int(torch.randint(1, T - start + 1, (1,), generator=g))
        mask[b, start : start + length] = True
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = _gae_reference(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


def test_gae_lam_one_gamma_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    mask = torch.ones(1, 4)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[6.0, 6.0, 5.0, 3.0]]))
    torch.testing.assert_close(adv, ret - values)


def test_whiten_masked():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = whiten(x, mask, eps=0.0)
    on = mask.bool()
    vals = w[on]
    torch.testing.assert_close(vals.mean(), torch.tensor(0.0))
    torch.testing.assert_close(vals.std(), torch.tensor(1.0))  # unbiased, as whiten's default
    assert (w[~on] == 0).all()
    # hand: masked entries 1,2,3,4,5: mean 3, unbiased var 2.5
    torch.testing.assert_close(w[0, 0], torch.tensor(-2 / math.sqrt(2.5)))
    w2 = whiten(x, mask, shift_mean=False, eps=0.0)
    torch.testing.assert_close(w2[on], vals + 3.0)


def test_group_advantages_hand_worked():
    """Groups of k = 4. Group 1 rewards (1, 0, 0, 1): mean 0.5, unbiased std sqrt(1/3) -> +-0.5*sqrt(3).
    Group 2 rewards (0, 0, 0, 1): mean 0.25, deviations (-.25, -.25, -.25, .75), unbiased var 0.75/3 = 0.25, std 0.5
    -> (-0.5, -0.5, -0.5, 1.5). Group 3 all equal -> 0."""
    r = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1, 2, 2, 2, 2])
    a = group_advantages(r, 4, eps=0.0 + 1e-12)
    s = 0.5 * math.sqrt(3)
    torch.testing.assert_close(a, torch.tensor([s, -s, -s, s, -0.5, -0.5, -0.5, 1.5, 0, 0, 0, 0]))
    c = group_advantages(r, 4, normalize_std=False)
    torch.testing.assert_close(c, torch.tensor([0.5, -0.5, -0.5, 0.5, -0.25, -0.25, -0.25, 0.75, 0, 0, 0, 0]))
    one = group_advantages(torch.tensor([3.0, -1.0]), 1)
    torch.testing.assert_close(one, torch.zeros(2))
    with pytest.raises(ValueError):
        group_advantages(torch.ones(5), 2)


def test_kl_penalized_rewards_hand():
    logps = torch.tensor([[0.0, -1.0, -2.0, -0.5]])
    ref = torch.tensor([[0.0, -1.5, -1.0, -9.0]])
    mask = torch.tensor([[0, 1, 1, 0]])
    rew, kl = kl_penalized_rewards(torch.tensor([2.0]), logps, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.0, 0.5, -1.0, 0.0]]))
    torch.testing.assert_close(rew, torch.tensor([[0.0, -0.05, 0.1 + 2.0, 0.0]]))
    _, k3 = kl_penalized_rewards(torch.tensor([2.0]), logps, ref, mask, kl_coef=0.1, estimator="k3")
    d = torch.tensor([-0.5, 1.0])  # ref - logp
    torch.testing.assert_close(k3[0, 1:3], torch.exp(d) - d - 1)


def test_kl_controllers():
    """init 0.2, target 6, horizon 10000. KL 12 -> error clipped to 0.2 -> 0.2 * (1 + 0.2 * 256/10000) = 0.201024.
    Then KL 5.4 -> error -0.1 -> 0.201024 * (1 - 0.1 * 512/10000)."""
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert c.update(12.0, 256) == pytest.approx(0.201024)
    assert c.update(5.4, 512) == pytest.approx(0.201024 * (1 - 0.1 * 0.0512))
    s = c.state_dict()
    c2 = AdaptiveKLController(1.0, 1.0, 1.0)
    c2.load_state_dict(s)
    assert c2.value == c.value and c2.target == 6.0
    f = FixedKLController(0.05)
    assert f.update(100.0, 1000) == 0.05 and f.value == 0.05
