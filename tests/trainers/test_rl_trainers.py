"""RLHF / RLVR / DPO trainers on the micro world model: special cases, IIF, the reward model, CLI end-to-end.

- ``full_training`` reproduces a plain PPO / GRPO / DPO step: the regularizer's ``.grad`` equals autograd of the
  standard mean objective on the same general batch (target rows never enter).
- IIF keeps exactly the records whose gradient has a nonnegative inner product with the target gradient (checked
  against per-record autograd gradients).
- The reward model learns to rank a trivially separable pair set.
- ``drpost rlhf|rlvr|dpo`` run end to end with tiny budgets and write metrics.json.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from drpost.objectives.dpo import dpo_loss_fn
from drpost.objectives.grpo import grpo_loss_fn
from drpost.objectives.logprobs import response_mask
from drpost.objectives.ppo import ppo_token_losses
from drpost.step import DataRegularizer
from drpost.trainers.rl_common import MixedRLLoss, check_reward_fn
from drpost.trainers.rlhf import DetachedValuePolicy, RLHFRecipe, iif_keep, ppo_rollouts
from drpost.trainers.rlvr import RLVRRecipe, grpo_rollouts
from drpost.world.evaluate import check
from drpost.world.rl_settings import build_rl_setting


@pytest.fixture(scope="module")
def micro():
    from drpost.world.model import load_base_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_base_model("micro")
    finally:
        torch.set_num_threads(threads)


def _length_reward(prompts, responses, examples):
    return torch.tensor([float(len(r)) for r in responses]) / 4.0


def _ppo_batches(micro, target_objective="reward"):
    model, tok = micro
    torch.manual_seed(0)
    policy = copy.deepcopy(model).train()
    wrapped = DetachedValuePolicy(policy)
    data = build_rl_setting("rlhf_format")
    recipe = RLHFRecipe(max_new_tokens=5, target_objective=target_objective)
    gen = torch.Generator().manual_seed(0)
    gb, _ = ppo_rollouts(wrapped, model, _length_reward, tok, data.general[:6], recipe, 0.05, gen, False)
    tb, _ = ppo_rollouts(wrapped, model, _length_reward, tok, data.target_train[:4], recipe, 0.05, gen, True)
    # perturb the policy so the ratio is not 1 everywhere (as in a later PPO epoch)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return policy, wrapped, gb, tb


def _grads(params):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def _zero(params):
    for p in params:
        p.grad = None


def test_ppo_full_training_is_a_plain_ppo_step(micro):
    policy, wrapped, gb, tb = _ppo_batches(micro)
    mixed = MixedRLLoss("ppo", "reward", vf_coef=0.5)
    reg = DataRegularizer(policy, method="full_training")
    report = reg.step(general=gb, target=tb, loss_fn=lambda _m, b: mixed(wrapped, b))
    assert not report.skipped
    assert reg._needs_capture  # the value head is outside the policy: this and later steps take the captured path
    n_tok = float(response_mask(gb["labels"]).sum())
    for p in wrapped.value_head.parameters():  # the trainer's token-mean rescale of the value head
        p.grad.div_(n_tok)
    params = list(policy.parameters()) + list(wrapped.value_head.parameters())
    got = _grads(params)
    _zero(params)

    out = wrapped(gb["input_ids"], gb["attention_mask"])
    from drpost.objectives.logprobs import aligned_token_logps, shift_values

    logps, mask = aligned_token_logps(out.logits, gb["labels"])
    terms = ppo_token_losses(logps, gb["old_logps"], gb["advantages"], mask, 0.2, values=shift_values(out.values),
                             old_values=gb["old_values"], returns=gb["returns"], clip_range_value=0.2, vf_coef=0.5)
    (terms["loss"].sum() / mask.sum()).backward()  # the standard token-mean PPO objective
    want = _grads(params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def _grpo_batches(micro):
    model, tok = micro
    data = build_rl_setting("rlvr_arith")
    recipe = RLVRRecipe(group_size=4, max_new_tokens=4, kl_coef=0.1)

    def reward(prompts, responses, examples):  # a dense stand-in for the verifier (micro rarely solves anything)
        return torch.tensor([float(len(r) % 2) for r in responses])

    gen = torch.Generator().manual_seed(1)
    gb, _ = grpo_rollouts(model, model, reward, tok, data.general[:3], recipe, gen, False)
    tb, _ = grpo_rollouts(model, model, reward, tok, data.target_train[:2], recipe, gen, True)
    return gb, tb


@pytest.mark.parametrize("unit", ["record", "group"])
def test_grpo_full_training_is_a_plain_grpo_step(micro, unit):
    model, tok = micro
    gb, tb = _grpo_batches(micro)
    if unit == "group":
        gb["sample_index"] = torch.arange(3).repeat_interleave(4)
    policy = copy.deepcopy(model).train()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    reg = DataRegularizer(policy, method="full_training")
    reg.step(general=gb, target=tb, loss_fn=MixedRLLoss("grpo", "reward", kl_coef=0.1))
    params = list(policy.parameters())
    got = _grads(params)
    _zero(params)
    rows, counts = grpo_loss_fn(kl_coef=0.1)(policy, gb)
    (rows.sum() / counts.sum()).backward()
    for g, w in zip(got, _grads(params)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_dpo_full_training_is_a_plain_dpo_step(micro):
    from drpost.trainers.dpo import PairBank

    model, tok = micro
    data = build_rl_setting("dpo_pairs")
    policy = copy.deepcopy(model).train()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    gbank, tbank = PairBank(tok, data.general[:5], model, 96), PairBank(tok, data.target_train[:2], model, 96)
    gb, tb = gbank.batch([0, 1, 2, 3, 4]), tbank.batch([0, 1])
    reg = DataRegularizer(policy, method="full_training")
    reg.step(general=gb, target=tb, loss_fn=dpo_loss_fn(0.1))
    params = list(policy.parameters())
    got = _grads(params)
    _zero(params)
    rows, counts = dpo_loss_fn(0.1)(policy, gb)
    (rows.sum() / counts.sum()).backward()  # mean DPO loss over the 5 pairs
    for g, w in zip(got, _grads(params)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_iif_drops_exactly_the_negative_records(micro):
    policy, wrapped, gb, tb = _ppo_batches(micro)
    mixed = MixedRLLoss("ppo", "reward", vf_coef=0.5)

    def loss_fn(_m, b):
        return mixed(wrapped, b)

    iif = DataRegularizer(policy, method="global_subset", selection="filter", frac=1.0)
    keep = iif_keep(iif, gb, tb, loss_fn)
    _zero(list(policy.parameters()) + list(wrapped.value_head.parameters()))

    params = list(policy.parameters())
    t_rows, t_counts = mixed(wrapped, tb)
    g_t = torch.autograd.grad(t_rows.sum() / t_counts.sum(), params)
    scores = []
    R = gb["input_ids"].shape[0]
    for i in range(R):  # each record's summed-loss gradient, by plain autograd
        rows, _ = mixed(wrapped, {k: v[i:i + 1] for k, v in gb.items()})
        g_i = torch.autograd.grad(rows.sum(), params, allow_unused=True)
        scores.append(sum(float((a * b).sum()) for a, b in zip(g_i, g_t) if a is not None))
    scores = torch.tensor(scores)
    assert 0 < int((scores >= 0).sum()) < R, scores  # the batch mixes aligned and opposed records
    expected = torch.nonzero(scores >= 0).flatten()
    assert keep.tolist() == expected.tolist(), (scores, keep)


def test_reward_model_ranks_separable_pairs(micro):
    from drpost.trainers.reward_model import encode_pairs, load_classifier, pair_accuracy, train_reward_model
    from drpost.world.pretrain import ensure_base_model

    _, tok = micro
    rng = random.Random(0)
    pairs = [{"prompt": f"Q: {rng.choice('abcdef') * rng.randint(1, 4)}\nA: ", "chosen": "yes", "rejected": "no"}
             for _ in range(64)]
    model = load_classifier(ensure_base_model("micro"))
    rm, metrics = train_reward_model(model, tok, pairs, steps=40, batch_size=16, lr=3e-3)
    assert metrics["train_pair_accuracy"] == 1.0
    assert pair_accuracy(rm, encode_pairs(tok, pairs[:16])) == 1.0


def test_verifier_reward(micro):
    _, tok = micro
    ex = [{"family": "add", "answer": "5"}, {"family": "add", "answer": "5"}]
    r = check_reward_fn(tok, check)([[1], [1]], [tok.encode("5", add_special_tokens=False) + [tok.eos_token_id],
                                                 tok.encode("6", add_special_tokens=False)], ex)
    assert r.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("command,args", [
    ("rlhf", ["steps=1", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=2", "ppo.ppo_epochs=1",
              "ppo.max_new_tokens=4", "target_batch_size=2", "regularizer.method=layerwise_subset"]),
    ("rlvr", ["steps=1", "grpo.group_size=2", "grpo.prompts_per_step=2", "grpo.max_new_tokens=4",
              "target_batch_size=1", "regularizer.method=global_subset", "regularizer.selection=filter",
              "regularizer.frac=1.0"]),
    ("dpo", ["steps=2", "general_batch_size=2", "target_batch_size=1", "regularizer.method=hull"]),
])
def test_cli_end_to_end(micro, tmp_path, monkeypatch, command, args):
    from drpost import cli
    from drpost.world import reward_model

    monkeypatch.setitem(reward_model.RM_RECIPE, "steps", 3)  # the CLI's world reward model, trained in seconds
    monkeypatch.setattr("drpost.bench.rl.N_TEST", 8, raising=False)
    out = tmp_path / command
    rc = cli.main([command, f"output_dir={out}", "model.size=micro", "device=cpu", "eval_every=0", *args])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["evals"], metrics
    assert (out / "config.yaml").exists()


@pytest.mark.parametrize("paradigm", ["rlvr", "dpo"])
def test_bench_rl_records_and_report(micro, tmp_path, monkeypatch, paradigm):
    from drpost.bench import rl
    from drpost.trainers.dpo import DPORecipe

    monkeypatch.setattr(rl, "N_TEST", 8)
    budget = DPORecipe(steps=2, general_batch_size=2, target_batch_size=1) if paradigm == "dpo" else \
        RLVRRecipe(steps=1, prompts_per_step=2, target_prompts=1, group_size=2, max_new_tokens=3)
    records = rl.run_rl(paradigm, methods=["full_training", "layerwise_subset"], seeds=[0, 1], budget=budget,
                        base_size="micro")
    assert [(r["method"], r["seed"]) for r in records] == [("base", 0), ("full_training", 0),
                                                           ("layerwise_subset", 0), ("full_training", 1),
                                                           ("layerwise_subset", 1)]
    table = rl.write_rl_results(paradigm, records, tmp_path, "drpost bench quality --paradigm " + paradigm)
    assert table["full_training"]["n"] == 2 and {"target_metric", "kl", "retention_em"} <= set(table["base"])
    text = (tmp_path / "README.md").read_text()
    assert "LayerWiseSubset" in text and "s/run" in text
    assert (tmp_path / "methods.png").exists() and (tmp_path / "curves.png").exists()
    assert len(json.loads((tmp_path / "summary.json").read_text())) == 5


@pytest.mark.parametrize("paradigm", ["rlhf", "rlvr", "dpo"])
def test_bench_rl_draws_the_data_from_the_seed(paradigm):
    """Seeds vary the data (general records, targets, test prompts), not only training; a seed is reproducible."""
    from drpost.bench import rl

    setting = rl.DEFAULT_SETTINGS[paradigm]
    ctx: dict = {}
    a, b = rl.seed_data(ctx, setting, 0), rl.seed_data(ctx, setting, 1)
    assert a.seed == 0 and b.seed == 1 and rl.seed_data(ctx, setting, 0) is a  # built once per seed
    for split in ("general", "target_train", "target_test"):
        assert getattr(a, split) != getattr(b, split), split
    again = rl.seed_data({}, setting, 1)
    assert (again.general, again.target_train, again.target_test) == (b.general, b.target_train, b.target_test)
