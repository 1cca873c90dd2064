"""DPO per-row loss: TRL's sigmoid-loss formula by hand, per-pair independence (each pair alone), sum over rows =
standard objective, and gradients of a pair's rows = autograd of that pair's loss alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from drpost.objectives.dpo import dpo_loss_fn, dpo_pair_losses, sequence_logps

BETA = 0.3


@pytest.fixture
def setup(U):
    policy, ref = U.tiny_lm(0), U.tiny_lm(1)
    rows = U.rows(6, seed=5)  # 3 pairs: (0 chosen, 1 rejected), (2, 3), (4, 5)
    batch = U.collate(rows, sample_index=[0, 0, 1, 1, 2, 2])
    batch["ref_logps"] = sequence_logps(ref, batch)
    return policy, ref, rows, batch


def _hand_pair_loss(pc, rc, pr, rr, beta=BETA):
    """TRL's DPO sigmoid loss: -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))."""
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def test_sequence_logps_matches_manual_and_has_no_grad(U, setup):
    policy, ref, rows, batch = setup
    lp = sequence_logps(policy, batch)
    assert lp.shape == (6,) and not lp.requires_grad
    manual = torch.stack([U.manual_logps(policy, r).sum() for r in rows]).detach()
    torch.testing.assert_close(lp, manual)


def test_rows_match_hand_formula(U, setup):
    policy, ref, rows, batch = setup
    loss_fn = dpo_loss_fn(beta=BETA)
    out, counts = loss_fn(policy, batch)
    pi = torch.stack([U.manual_logps(policy, r).sum() for r in rows])
    rf = torch.stack([U.manual_logps(ref, r).sum() for r in rows])
    for j in range(3):
        c, r = 2 * j, 2 * j + 1
        torch.testing.assert_close(out[c], _hand_pair_loss(pi[c], rf[c], pi[r], rf[r]))
        assert out[r].item() == 0.0
    torch.testing.assert_close(counts, torch.tensor([1.0, 0, 1, 0, 1, 0]))
    # stats: implicit rewards beta (pi - ref), margins, accuracies
    st = loss_fn.stats
    torch.testing.assert_close(st["chosen_rewards"], BETA * (pi[0::2] - rf[0::2]).detach())
    torch.testing.assert_close(st["margins"], st["chosen_rewards"] - st["rejected_rewards"])
    torch.testing.assert_close(st["accuracies"], (st["margins"] > 0).double())


def test_label_smoothing_formula():
    pi = torch.tensor([-3.0, -4.0, -2.0, -1.0])
    rf = torch.tensor([-3.5, -3.0, -2.5, -1.5])
    eps = 0.1
    loss, _, _ = dpo_pair_losses(pi, rf, BETA, label_smoothing=eps)
    h = torch.tensor([(-3.0 + 3.5) - (-4.0 + 3.0), (-2.0 + 2.5) - (-1.0 + 1.5)])
    torch.testing.assert_close(loss, -(1 - eps) * F.logsigmoid(BETA * h) - eps * F.logsigmoid(-BETA * h))


def test_each_pair_alone_gives_the_same_row_losses(U, setup):
    policy, ref, rows, batch = setup
    out, _ = dpo_loss_fn(BETA)(policy, batch)
    for j in range(3):
        alone = U.collate(rows[2 * j : 2 * j + 2], sample_index=[0, 0])
        alone["ref_logps"] = sequence_logps(ref, alone)
        o, c = dpo_loss_fn(BETA)(policy, alone)
        torch.testing.assert_close(o, out[2 * j : 2 * j + 2])
        torch.testing.assert_close(c, torch.tensor([1.0, 0.0]))


def test_sum_over_rows_is_the_standard_objective(U, setup):
    policy, ref, rows, batch = setup
    out, counts = dpo_loss_fn(BETA)(policy, batch)
    pi = torch.stack([U.manual_logps(policy, r).sum() for r in rows])
    rf = sequence_logps(ref, batch)
    pair = torch.stack([_hand_pair_loss(pi[2 * j], rf[2 * j], pi[2 * j + 1], rf[2 * j + 1]) for j in range(3)])
    torch.testing.assert_close(out.sum(), pair.sum())
    torch.testing.assert_close(out.sum() / counts.sum(), pair.mean())  # token mean == pair mean


def test_pair_gradient_matches_autograd_of_the_pair_alone(U, setup):
    policy, ref, rows, batch = setup
    params = [p for p in policy.parameters() if p.requires_grad]
    out, _ = dpo_loss_fn(BETA)(policy, batch)
    for j in range(3):
        g_rows = torch.autograd.grad(out[2 * j] + out[2 * j + 1], params, retain_graph=True, allow_unused=True)
        pc, pr = U.manual_logps(policy, rows[2 * j]).sum(), U.manual_logps(policy, rows[2 * j + 1]).sum()
        rf = batch["ref_logps"]
        pair = _hand_pair_loss(pc, rf[2 * j], pr, rf[2 * j + 1])
        g_pair = torch.autograd.grad(pair, params, retain_graph=True, allow_unused=True)
        for a, b in zip(g_rows, g_pair):
            a = torch.zeros_like(b) if a is None else a
            b = torch.zeros_like(a) if b is None else b
            torch.testing.assert_close(a, b)
        # the rejected row is in the graph: dropping it (policy log-prob of the rejected row held fixed) changes
        # the gradient
        frozen = _hand_pair_loss(pc, rf[2 * j], pr.detach(), rf[2 * j + 1])
        g_frozen = torch.autograd.grad(frozen, params, allow_unused=True)
        diff = sum((a - b).abs().sum() for a, b in zip(g_pair, g_frozen) if a is not None and b is not None)
        assert diff > 1e-6


def test_odd_rows_and_missing_ref_raise(U, setup):
    policy, ref, rows, batch = setup
    bad = {k: v[:5] for k, v in batch.items()}
    with pytest.raises(ValueError):
        dpo_loss_fn(BETA)(policy, bad)
    with pytest.raises(KeyError):
        dpo_loss_fn(BETA)(policy, {k: v for k, v in batch.items() if k != "ref_logps"})
