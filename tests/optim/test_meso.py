"""MeSO (drpost.optim.meso): memory, exactness against torch AdamW with identity sketches, descent, save/load."""

import copy

import pytest
import torch
from torch import nn

from drpost.optim.meso import MeSO, state_bytes


def mlp(width=256, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                         nn.Linear(width, 8)).to(dtype)


def run(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 64, generator=g, dtype=next(model.parameters()).dtype)  # (32, 64)
    w = torch.randn(64, 8, generator=g, dtype=x.dtype)
    y = torch.tanh(x @ w)  # (32, 8) regression target
    losses = []
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def test_state_is_at_least_4x_smaller_than_adamw():
    a, b = mlp(512), mlp(512)
    adam = torch.optim.AdamW(a.parameters(), lr=1e-3)
    meso = MeSO(b.parameters(), lr=1e-3, sketch=(64, 64))
    run(a, adam, 1)
    run(b, meso, 1)
    assert state_bytes(adam) >= 4 * state_bytes(meso), (state_bytes(adam), state_bytes(meso))
    # 2-D weights hold (k_out, k_in) moments; 1-D parameters ordinary ones
    w = b[3].weight
    assert meso.state[w]["exp_avg"].shape == (64, 64)
    assert meso.state[b[1].weight]["exp_avg"].shape == (512,)


def test_identity_sketch_matches_torch_adamw_float64():
    a = mlp(32, dtype=torch.float64)
    b = copy.deepcopy(a)
    kw = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    adam = torch.optim.AdamW(a.parameters(), foreach=False, **kw)
    meso = MeSO(b.parameters(), sketch=(1024, 1024), **kw)  # k >= every dimension: identity sketches
    la, lb = run(a, adam, 6), run(b, meso, 6)
    assert la == lb
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-14)


def test_regression_loss_decreases():
    model = mlp(256)
    opt = MeSO(model.parameters(), lr=3e-3, weight_decay=0.0, sketch=(32, 32), seed=3)
    losses = run(model, opt, 60)
    assert losses[-1] < 0.5 * losses[0]


def test_state_dict_round_trip_resumes_identically():
    a = mlp(128)
    opt = MeSO(a.parameters(), lr=1e-3, sketch=(16, 16), seed=7)
    run(a, opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    b = copy.deepcopy(a)
    opt_b = MeSO(b.parameters(), lr=1e-3, sketch=(16, 16), seed=0)  # seed restored from the state dict
    opt_b.load_state_dict(sd)
    assert opt_b.seed == 7
    run(a, opt, 2, seed=5)
    run(b, opt_b, 2, seed=5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="sketch"):
        MeSO(mlp(8).parameters(), sketch=(0, 4))
    with pytest.raises(ValueError, match="lr"):
        MeSO(mlp(8).parameters(), lr=-1)
