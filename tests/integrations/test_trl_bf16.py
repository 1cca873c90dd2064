"""TRL adapters under TRL's default precision: ``SFTConfig`` / ``DPOConfig`` / ``GRPOConfig`` default to ``bf16=True``,
also on CPU, where accelerate runs the model's forward under CPU bf16 autocast and the Trainer runs the backward
outside it. Each adapter must train there (global and layer scope), and ``full_training`` must give the plain TRL
trainer's update within a bf16 tolerance.

Tolerance: per parameter tensor, ``||d_dr - d_trl|| <= BF16_RTOL * ||d_trl||`` with ``d`` the one-step SGD update;
both sides round activations and products to bf16 (8 significant bits, unit roundoff 2^-9 ~ 2e-3) but in a
different order (TRL's fused LM head vs drpost's per-row loss and factored assembly), so a few units of roundoff
per layer add up to a few percent at most (measured worst tensor: 0.9%, on q_proj, for all three trainers).

Models are tiny fp32 Llamas built from a config; the tokenizer is drpost's offline byte-level one: no downloads.
Run: ``.venv/bin/pytest -q tests/integrations/test_trl_bf16.py``
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from drpost.integrations.trl import DrDPOTrainer, DrGRPOTrainer, DrSFTTrainer  # noqa: E402
from drpost.world.tokenizer import build_tokenizer  # noqa: E402
from tests.integrations.trl_data import dpo_data, params, prompts, sft_data  # noqa: E402

BF16_RTOL = 3e-2
# no ``bf16`` key: TRL's default (True) is what is under test
COMMON = dict(report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=1, optim="sgd",
              max_grad_norm=0.0, lr_scheduler_type="constant", warmup_steps=0, disable_tqdm=True)
METHODS = [("global_subset", {"frac": 0.5}), ("layerwise_subset", {"frac": 0.5})]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def tiny(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id, attn_implementation="eager")
    return LlamaForCausalLM(cfg)  # fp32 weights, as a user trains them under autocast







def reward_len(completions, **kw):
    """Deterministic verifiable reward of the completion text (sum of code points mod 5)."""
    return [float(sum(map(ord, c)) % 5) for c in completions]


def assert_bf16(tr):
    assert tr.args.bf16 and tr.accelerator.mixed_precision == "bf16"


def assert_trained(tr, before, model):
    after = params(model)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any((after[n] != before[n]).any() for n in before)
    rep = tr.dr_last_report
    assert rep is not None and not rep.skipped
    assert math.isfinite(rep.loss) and math.isfinite(rep.target_loss)
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)


def assert_close_update(before, got, want, rtol=BF16_RTOL):
    err = {}
    for n in before:
        dg, dw = got[n] - before[n], want[n] - before[n]
        if float(dw.norm()) > 0:
            err[n] = float((dg - dw).norm() / dw.norm())
        else:
            assert float(dg.norm()) == 0, n
    worst = max(err, key=err.get)
    assert err[worst] <= rtol, (worst, err[worst])


def test_trl_configs_default_to_bf16(tmp_path):
    from trl import DPOConfig, GRPOConfig, SFTConfig

    for cls in (SFTConfig, DPOConfig, GRPOConfig):
        assert cls(output_dir=str(tmp_path), use_cpu=True).bf16 is True, cls.__name__


# --------------------------------------------------------------------------- SFT
@pytest.mark.parametrize("method,opts", METHODS)
def test_sft_trains_under_default_bf16(tok, tmp_path, method, opts):
    from trl import SFTConfig

    m = tiny(tok)
    before = params(m)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=0.1,
                     **COMMON)
    tr = DrSFTTrainer(model=m, args=args, train_dataset=sft_data(8), processing_class=tok,
                      target_dataset=sft_data(2, off=30), dr_method=method, dr_options=opts)
    assert_bf16(tr)
    tr.train()
    assert_trained(tr, before, m)


def test_sft_full_training_matches_plain_sft_in_bf16(tok, tmp_path):
    from trl import SFTConfig, SFTTrainer

    base = tiny(tok)
    before = params(base)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=0.5,
                     **COMMON)
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    SFTTrainer(model=m1, args=args, train_dataset=sft_data(8), processing_class=tok).train()
    tr = DrSFTTrainer(model=m2, args=args, train_dataset=sft_data(8), processing_class=tok,
                      target_dataset=sft_data(3, off=20), dr_method="full_training")
    assert_bf16(tr)
    tr.train()
    assert_close_update(before, params(m2), params(m1))


# --------------------------------------------------------------------------- DPO
@pytest.mark.parametrize("method,opts", METHODS)
def test_dpo_trains_under_default_bf16(tok, tmp_path, method, opts):
    from trl import DPOConfig

    m = tiny(tok)
    before = params(m)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=0.5,
                     beta=0.5, **COMMON)
    tr = DrDPOTrainer(model=m, ref_model=copy.deepcopy(m), args=args, train_dataset=dpo_data(8),
                      processing_class=tok, target_dataset=dpo_data(2, off=20), dr_method=method, dr_options=opts)
    assert_bf16(tr)
    tr.train()
    assert_trained(tr, before, m)


def test_dpo_full_training_matches_plain_dpo_in_bf16(tok, tmp_path):
    from trl import DPOConfig, DPOTrainer

    base = tiny(tok)
    before = params(base)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=2.0,
                     beta=0.5, **COMMON)
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    DPOTrainer(model=m1, ref_model=copy.deepcopy(base), args=args, train_dataset=dpo_data(8),
               processing_class=tok).train()
    tr = DrDPOTrainer(model=m2, ref_model=copy.deepcopy(base), args=args, train_dataset=dpo_data(8),
                      processing_class=tok, target_dataset=dpo_data(3, off=20), dr_method="full_training")
    assert_bf16(tr)
    tr.train()
    assert_close_update(before, params(m2), params(m1))


# --------------------------------------------------------------------------- GRPO
def grpo_args(tmp_path, **kw):
    from trl import GRPOConfig

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                max_completion_length=5, learning_rate=0.5, temperature=1.0, beta=0.0, loss_type="bnpo")
    base.update(kw)
    return GRPOConfig(**base, **COMMON)


@pytest.mark.parametrize("method,opts", [("global_subset", {"frac": 0.5, "selection": "filter"}),
                                         ("layerwise_subset", {"frac": 0.5, "selection": "filter"})])
def test_grpo_trains_under_default_bf16(tok, tmp_path, method, opts):
    m = tiny(tok)
    before = params(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = DrGRPOTrainer(model=m, reward_funcs=reward_len, args=grpo_args(tmp_path, max_steps=2),
                           train_dataset=prompts(8), processing_class=tok, target_dataset=prompts(3, off=10),
                           dr_method=method, dr_options=opts)
        assert_bf16(tr)
        tr.train()
    after = params(m)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any((after[n] != before[n]).any() for n in before)
    rep = tr.dr_last_report
    assert rep is not None and rep.weights.shape[-1] == 4 and math.isfinite(rep.loss)


def test_grpo_full_training_matches_plain_grpo_in_bf16(tok, tmp_path):
    """Same generated batch, forward under the accelerator's bf16 autocast (the prepared model's forward), backward
    outside it: TRL's compute_loss gradient vs the adapter's regularized backward."""
    from trl import GRPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = DrGRPOTrainer(model=tiny(tok), reward_funcs=reward_len, args=grpo_args(tmp_path, max_steps=1,
                                                                                     num_generations=4),
                           train_dataset=prompts(8), processing_class=tok, target_dataset=prompts(2, off=10),
                           dr_method="full_training")
    assert_bf16(tr)
    tr.current_gradient_accumulation_steps = 1
    m = tr.accelerator.prepare_model(tr.model)  # as train() does: the forward now runs under bf16 autocast
    m.train()
    torch.manual_seed(1)
    raw = [{"prompt": p} for p in prompts(1)["prompt"] for _ in range(4)]
    inputs = tr._prepare_inputs(raw)  # the general rows and a target group, from one generate call
    assert float(inputs["advantages"].abs().sum()) > 0  # the batch carries signal

    m.zero_grad(set_to_none=True)
    GRPOTrainer.compute_loss(tr, m, inputs).backward()  # outside autocast, as the Trainer does
    want = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    general = tr._dr_rows(inputs, m, target=False)
    target = tr._dr_rows(tr._dr_next_target(), m, target=True)
    tr._dr_backward(m, general, target)
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    zero = {n: torch.zeros_like(g) for n, g in want.items()}
    assert_close_update(zero, got, want)
