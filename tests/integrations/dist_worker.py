"""Worker of tests/integrations/test_distributed.py: one gloo rank of a 2-process data-parallel drpost run.

Each check runs on every rank; an AssertionError in any rank fails the spawning test. Not collected by pytest.
"""

from __future__ import annotations

import copy
import datetime

import torch
import torch.distributed as dist

import drpost
from drpost.integrations.distributed import broadcast_parameters, max_parameter_divergence
from drpost.objectives import causal_lm_loss
from tests.helpers import batch, tiny_model

# (a) several AdamW steps, ranks must stay identical
TRAIN = [
    dict(method="full_training"),
    dict(method="global_subset", frac=0.5),
    dict(method="layerwise_subset", frac=0.5),
    dict(method="hull"),
]
# (b) one step, 2 processes == 1 process on the union of both ranks' rows
EQUIV = [
    dict(method="full_training"),
    dict(method="target_only"),
    dict(method="global_subset", frac=0.5),
    dict(method="global_subset", frac=0.5, scoring="direct"),
    dict(method="global_subset", frac=0.5, selection="greedy"),
    dict(method="layerwise_subset", frac=0.5),
    dict(method="layerwise_subset", frac=0.5, assembly="two_pass"),
    dict(method="hull"),
    dict(method="capped_simplex", k=3),
    dict(method="hull", slack="auto"),
    dict(method="hull", scoring="compress", sketch="4x4"),
]


def _cat(a: dict, b: dict) -> dict:
    T = max(a["input_ids"].shape[1], b["input_ids"].shape[1])

    def pad(x, v):
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=v)

    return {k: torch.cat([pad(a[k], -100 if k == "labels" else 0), pad(b[k], -100 if k == "labels" else 0)])
            for k in ("input_ids", "attention_mask", "labels")}


def _rows(rank: int, step: int):
    """This rank's rows: unequal row counts and lengths across ranks on purpose."""
    gen = batch(3 + rank, T=9 - rank, seed=1000 * step + 10 * rank + 1)
    tgt = batch(1 + rank, T=7, seed=1000 * step + 10 * rank + 2)
    return gen, tgt


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _close(a: dict, b: dict, what: str, rtol: float = 1e-6):
    assert a.keys() == b.keys(), what
    for k in a:
        scale = b[k].abs().max().clamp_min(1e-30)
        err = float((a[k] - b[k]).abs().max() / scale)
        assert err <= rtol, f"{what}: {k} differs by {err:.3g} (relative)"


def check_training(rank: int, world: int):
    base = tiny_model("llama", seed=rank)  # different init per rank on purpose: broadcast_parameters syncs it
    for kw in TRAIN:
        model = copy.deepcopy(base)
        broadcast_parameters(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        reg = drpost.DataRegularizer(model, optimizer=opt, **kw)
        for s in range(3):
            gen, tgt = _rows(rank, s)
            rep = reg.step(general=gen, target=tgt, loss_fn=causal_lm_loss)
            assert not rep.skipped, (kw, rep.skip_reason)
            assert rep.weights.shape[-1] == 3 + 4, kw  # global sample count
            opt.step()
            opt.zero_grad(set_to_none=True)
        div = max_parameter_divergence(model)
        assert div == 0.0, f"{kw}: ranks diverged by {div}"


def check_equivalence(rank: int, world: int):
    model = tiny_model("llama")
    gens, tgts = zip(*[_rows(r, 0) for r in range(world)])
    union_g, union_t = _cat(*gens), _cat(*tgts)
    for kw in EQUIV:
        reg = drpost.DataRegularizer(model, **kw)
        model.zero_grad(set_to_none=True)
        rep = reg.step(general=gens[rank], target=tgts[rank], loss_fn=causal_lm_loss, lr=0.1)
        assert not rep.skipped, (kw, rep.skip_reason)
        got = _grads(model)
        model.zero_grad(set_to_none=True)
        ref_reg = drpost.DataRegularizer(model, process_group=None, **kw)
        ref = ref_reg.step(general=union_g, target=union_t, loss_fn=causal_lm_loss, lr=0.1)
        want = _grads(model)
        model.zero_grad(set_to_none=True)
        _close(got, want, f"{kw} grads")
        torch.testing.assert_close(rep.weights, ref.weights, rtol=1e-6, atol=1e-9, msg=lambda m, kw=kw: f"{kw}: {m}")
        torch.testing.assert_close(rep.scores, ref.scores, rtol=1e-6, atol=1e-12) if ref.scores is not None else None
        assert abs(rep.loss - ref.loss) <= 1e-9 * max(1.0, abs(ref.loss)), kw
        # row weights (no .grad written) must be this rank's slice of the union's
        if kw.get("assembly") != "two_pass" and "slack" not in kw:
            c, _ = drpost.DataRegularizer(model, **kw).row_weights(gens[rank], tgts[rank], causal_lm_loss, lr=0.1)
            c_ref, _ = drpost.DataRegularizer(model, process_group=None, **kw).row_weights(
                union_g, union_t, causal_lm_loss, lr=0.1)
            ng = [g["input_ids"].shape[0] for g in gens]
            nt = [t["input_ids"].shape[0] for t in tgts]
            Ng = sum(ng)
            mine = list(range(sum(ng[:rank]), sum(ng[: rank + 1])))
            mine += [Ng + i for i in range(sum(nt[:rank]), sum(nt[: rank + 1]))]
            torch.testing.assert_close(c, c_ref[..., mine], rtol=1e-6, atol=1e-12)
        for p in model.parameters():
            assert p.grad is None


def run(rank: int, world: int, port: int, which: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        if which in ("all", "training"):
            check_training(rank, world)
        if which in ("all", "equivalence"):
            check_equivalence(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
