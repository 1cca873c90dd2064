"""TRL adapters (drpost.integrations.trl): each trains a tiny offline model for a few steps, and with
``dr_method="full_training"`` one step reproduces the plain TRL trainer's update (SGD, no clipping, float64).

Models are built from a config, the tokenizer is drpost's offline byte-level one: no downloads.
Run: ``.venv/bin/pytest -q tests/integrations/test_trl.py``
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from drpost.integrations.trl import TRL_RANGE, DrDPOTrainer, DrGRPOTrainer, DrSFTTrainer  # noqa: E402
from drpost.world.tokenizer import build_tokenizer  # noqa: E402
from tests.integrations.trl_data import dpo_data, params, prompts, sft_data  # noqa: E402

COMMON = dict(report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=1, optim="sgd",
              max_grad_norm=0.0, lr_scheduler_type="constant", warmup_steps=0, disable_tqdm=True,
              bf16=False)  # TRL configs default to bf16 autocast, even on CPU: exact float64 comparisons need it off


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def tiny(tok, seed=0, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id, attn_implementation="eager")
    return LlamaForCausalLM(cfg).to(torch.float64)



def assert_same_update(before, a, b, rtol=1e-6):  # TRL's fused LM head runs in float32 internally
    for n in before:
        da, db = a[n] - before[n], b[n] - before[n]
        scale = db.abs().max().clamp_min(1e-30)
        assert float((da - db).abs().max() / scale) <= rtol, n





def test_supported_trl_version():
    from packaging.version import Version

    lo, hi = (Version(s.lstrip("<>=")) for s in TRL_RANGE)
    assert lo <= Version(trl.__version__) < hi


# --------------------------------------------------------------------------- SFT
def test_sft_full_training_reproduces_plain_sft(tok, tmp_path):
    from trl import SFTConfig, SFTTrainer

    base = tiny(tok)
    before = params(base)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=0.5,
                     **COMMON)
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    SFTTrainer(model=m1, args=args, train_dataset=sft_data(8), processing_class=tok).train()
    DrSFTTrainer(model=m2, args=args, train_dataset=sft_data(8), processing_class=tok,
                 target_dataset=sft_data(3, off=20), dr_method="full_training").train()
    assert_same_update(before, params(m2), params(m1))
    assert any((params(m1)[n] != before[n]).any() for n in before)


def test_sft_full_training_reproduces_plain_sft_with_uneven_accumulation(tok, tmp_path):
    """Gradient accumulation over micro-steps of unequal token counts: the plain trainer's update is the token mean
    over the whole window (transformers' num_items_in_batch), not the mean of the micro-steps' token means."""
    from trl import SFTConfig, SFTTrainer

    data = datasets.Dataset.from_dict({"prompt": [f"q{i}=" for i in range(4)],
                                       "completion": [("abcdefgh" * 4)[:k] for k in (2, 4, 9, 30)]})
    base = tiny(tok)
    before = params(base)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     max_steps=1, learning_rate=0.5, **COMMON)
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    SFTTrainer(model=m1, args=args, train_dataset=data, processing_class=tok).train()
    DrSFTTrainer(model=m2, args=args, train_dataset=data, processing_class=tok, target_dataset=sft_data(2),
                 dr_method="full_training").train()
    assert_same_update(before, params(m2), params(m1))  # 0.42 relative apart with a 1 / accumulation weight


@pytest.mark.parametrize("method,opts", [("global_subset", {"frac": 0.5}), ("layerwise_subset", {"frac": 0.5}),
                                         ("hull", {})])
def test_sft_trains(tok, tmp_path, method, opts):
    from trl import SFTConfig

    m = tiny(tok)
    before = params(m)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=0.1,
                     gradient_accumulation_steps=2 if method == "layerwise_subset" else 1, **COMMON)
    tr = DrSFTTrainer(model=m, args=args, train_dataset=sft_data(16), processing_class=tok,
                      target_dataset=sft_data(2, off=30), target_batch_size=1, dr_method=method, dr_options=opts)
    out = tr.train()
    after = params(m)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any((after[n] != before[n]).any() for n in before)
    assert any((after[n] != before[n]).any() for n in before)
    assert out.training_loss == out.training_loss
    rep = tr.dr_last_report
    assert rep is not None and not rep.skipped and rep.weights.shape[-1] == 4
    if method != "hull":
        assert 0 < int((rep.weights[0] != 0).sum()) < 4
    assert any("dr/target_loss" in h for h in tr.state.log_history)


# --------------------------------------------------------------------------- DPO
def test_dpo_full_training_reproduces_plain_dpo(tok, tmp_path):
    from trl import DPOConfig, DPOTrainer

    base = tiny(tok)
    before = params(base)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=2.0,
                     beta=0.5, **COMMON)
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    DPOTrainer(model=m1, ref_model=copy.deepcopy(base), args=args, train_dataset=dpo_data(8),
               processing_class=tok).train()
    DrDPOTrainer(model=m2, ref_model=copy.deepcopy(base), args=args, train_dataset=dpo_data(8),
                 processing_class=tok, target_dataset=dpo_data(3, off=20), dr_method="full_training").train()
    assert_same_update(before, params(m2), params(m1))


def test_dpo_trains(tok, tmp_path):
    from trl import DPOConfig

    m = tiny(tok)
    before = params(m)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=0.5,
                     beta=0.5, **COMMON)
    tr = DrDPOTrainer(model=m, ref_model=copy.deepcopy(m), args=args, train_dataset=dpo_data(12),
                      processing_class=tok, target_dataset=dpo_data(2, off=20), dr_method="global_subset",
                      dr_options={"frac": 0.5})
    tr.train()
    rep = tr.dr_last_report
    assert not rep.skipped and rep.weights.shape == (1, 4)  # one sample per pair
    assert int((rep.weights != 0).sum()) == 2
    assert any((params(m)[n] != before[n]).any() for n in before)


def test_dpo_refuses_unsupported_loss(tok, tmp_path):
    from trl import DPOConfig

    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, loss_type=["hinge"],
                     **COMMON)
    m = tiny(tok)
    with pytest.raises(NotImplementedError, match="loss_type"):
        DrDPOTrainer(model=m, ref_model=copy.deepcopy(m), args=args, train_dataset=dpo_data(4),
                     processing_class=tok, target_dataset=dpo_data(2))


def test_dpo_refuses_loss_weights(tok, tmp_path):
    from trl import DPOConfig

    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, loss_weights=[0.5],
                     **COMMON)
    m = tiny(tok)
    with pytest.raises(NotImplementedError, match="loss_weights"):
        DrDPOTrainer(model=m, ref_model=copy.deepcopy(m), args=args, train_dataset=dpo_data(4),
                     processing_class=tok, target_dataset=dpo_data(2))


@pytest.mark.parametrize("option,value", [("loss_type", "dft"), ("label_smoothing_factor", 0.1)])
def test_sft_refuses_options_that_change_the_loss(tok, tmp_path, option, value):
    from trl import SFTConfig

    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, **{option: value},
                     **COMMON)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NotImplementedError, match=option):
            DrSFTTrainer(model=tiny(tok), args=args, train_dataset=sft_data(4), processing_class=tok,
                         target_dataset=sft_data(2, off=10))


def _tiny_moe(tok):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                        bos_token_id=tok.bos_token_id)
    assert cfg.router_aux_loss_coef > 0  # the architecture's own coefficient, which TRL applies by default
    return MixtralForCausalLM(cfg).to(torch.float64)


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo"])
def test_moe_router_aux_loss_is_refused_unless_switched_off(tok, tmp_path, kind):
    """TRL adds an MoE router's load-balancing loss by default; it is not a sum over samples, so the adapters refuse
    it by name, and train once the config switches it off (router_aux_loss_coef=0.0)."""
    from trl import DPOConfig, GRPOConfig, SFTConfig

    def build(coef):
        kw = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, router_aux_loss_coef=coef,
                  **COMMON)
        m = _tiny_moe(tok)
        if kind == "sft":
            return DrSFTTrainer(model=m, args=SFTConfig(**kw), train_dataset=sft_data(4), processing_class=tok,
                                target_dataset=sft_data(2, off=10), dr_method="full_training")
        if kind == "dpo":
            return DrDPOTrainer(model=m, ref_model=copy.deepcopy(m), args=DPOConfig(**kw), train_dataset=dpo_data(4),
                                processing_class=tok, target_dataset=dpo_data(2, off=10), dr_method="full_training")
        return DrGRPOTrainer(model=m, reward_funcs=reward_len, train_dataset=prompts(4), processing_class=tok,
                             args=GRPOConfig(num_generations=2, max_completion_length=4, **kw),
                             target_dataset=prompts(2, off=10), dr_method="full_training")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NotImplementedError, match="router_aux_loss_coef=0.0"):
            build(None)  # None = the model config's coefficient
        tr = build(0.0)
    assert not tr.aux_loss_enabled


# --------------------------------------------------------------------------- GRPO
def reward_len(completions, **kw):
    """Deterministic verifiable reward of the completion text (sum of code points mod 5)."""
    return [float(sum(map(ord, c)) % 5) for c in completions]


def grpo_args(tmp_path, **kw):
    from trl import GRPOConfig

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                max_completion_length=5, learning_rate=0.5, temperature=1.0, beta=0.0, loss_type="bnpo")
    base.update(kw)
    return GRPOConfig(**base, **COMMON)



@pytest.mark.parametrize("loss_type,beta,temperature", [("bnpo", 0.0, 1.0), ("grpo", 0.04, 0.7)])
def test_grpo_full_training_matches_plain_grpo_on_a_fixed_batch(tok, tmp_path, loss_type, beta, temperature):
    """Same generated batch: TRL's compute_loss gradient == the adapter's weighted-loss gradient."""
    from trl import GRPOTrainer

    m = tiny(tok)
    if beta:  # TRL builds the KL reference from the model's path: save the tiny model
        m.save_pretrained(tmp_path / "tiny")
        m = str(tmp_path / "tiny")
    args = grpo_args(tmp_path, max_steps=1, loss_type=loss_type, beta=beta, temperature=temperature, num_generations=4,
                     model_init_kwargs={"dtype": torch.float64} if beta else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = DrGRPOTrainer(model=m, reward_funcs=reward_len, args=args, train_dataset=prompts(8),
                           processing_class=tok, target_dataset=prompts(2, off=10), dr_method="full_training")
    tr.current_gradient_accumulation_steps = 1
    m = tr.model
    assert m.dtype == torch.float64
    m.train()
    torch.manual_seed(1)
    raw = [{"prompt": p} for p in prompts(1)["prompt"] for _ in range(4)]
    inputs = tr._prepare_inputs(raw)  # the general rows and a target group, from one generate call

    m.zero_grad(set_to_none=True)
    GRPOTrainer.compute_loss(tr, m, inputs).backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    general = tr._dr_rows(inputs, m, target=False)
    target = tr._dr_rows(tr._dr_next_target(), m, target=True)
    tr._dr_backward(m, general, target)
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    scale = max(float(w.abs().max()) for w in want.values())
    assert scale > 0  # the batch carries signal (nonzero advantages)
    for n in want:
        assert float((got[n] - want[n]).abs().max()) <= 1e-6 * scale, n


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo"])
def test_grpo_full_training_matches_plain_grpo_over_uneven_micro_steps(tok, tmp_path, loss_type):
    """Two accumulation micro-steps of one generation batch with unequal completion tokens: dapo's normalizer is the
    generation batch's token count (so the window's update is its token mean), bnpo and grpo average each micro-step
    and divide by the accumulation steps; the adapter's accumulated .grad equals plain TRL's for each."""
    from trl import GRPOTrainer
    from trl.trainer.utils import split_tensor_dict

    args = grpo_args(tmp_path, max_steps=1, loss_type=loss_type, num_generations=4, gradient_accumulation_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = DrGRPOTrainer(model=tiny(tok), reward_funcs=reward_len, args=args, train_dataset=prompts(8),
                           processing_class=tok, target_dataset=prompts(2, off=10), dr_method="full_training")
    m = tr.model
    m.train()
    tr.current_gradient_accumulation_steps = 2
    torch.manual_seed(1)
    batch = tr._generate_and_score_completions([{"prompt": p} for p in prompts(2)["prompt"] for _ in range(4)])
    mask = batch["completion_mask"].clone()
    mask[:4, 1:] = 0  # the first micro-step keeps one completion token per row, the second all of theirs
    batch["completion_mask"], batch["num_items_in_batch"] = mask, mask.sum()
    chunks = split_tensor_dict(batch, 2)  # TRL's micro-steps of the generation batch
    m.zero_grad(set_to_none=True)
    for c in chunks:
        GRPOTrainer.compute_loss(tr, m, c).backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    for c in chunks:  # full_training: the target rows (here the same rows) do not enter the update
        tr._dr_backward(m, tr._dr_rows(c, m, False), tr._dr_rows(c, m, True), tr._dr_window_items(c, None))
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    scale = max(float(w.abs().max()) for w in want.values())
    assert got.keys() == want.keys() and scale > 0
    for n in want:
        assert float((got[n] - want[n]).abs().max()) <= 1e-6 * scale, n


def test_grpo_trains(tok, tmp_path):
    m = tiny(tok)
    before = params(m)
    args = grpo_args(tmp_path, max_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = DrGRPOTrainer(model=m, reward_funcs=reward_len, args=args, train_dataset=prompts(8),
                           processing_class=tok, target_dataset=prompts(3, off=10), dr_method="global_subset",
                           dr_options={"frac": 0.5, "selection": "filter"})
        tr.train()
    rep = tr.dr_last_report
    assert rep is not None and rep.weights.shape[-1] == 4
    after = params(m)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any((after[n] != before[n]).any() for n in before)


# --------------------------------------------------------------------------- DPO reference for the target pairs
def _logged(tr, key):
    return [h[key] for h in tr.state.log_history if key in h]


def test_dpo_precomputed_reference_covers_target_pairs(tok, tmp_path):
    """precompute_ref_log_probs=True, no ref_model: the target pairs get the initial model's log-probs, so the run
    equals one with an explicit frozen ref_model, and dr/target_loss leaves ln 2 once the policy has moved."""
    from trl import DPOConfig

    base = tiny(tok)
    runs = {}
    for mode in ("precompute", "ref_model"):
        args = DPOConfig(output_dir=str(tmp_path / mode), per_device_train_batch_size=4, max_steps=3,
                         learning_rate=2.0, beta=0.5, precompute_ref_log_probs=mode == "precompute", **COMMON)
        m = copy.deepcopy(base)
        tr = DrDPOTrainer(model=m, ref_model=None if mode == "precompute" else copy.deepcopy(base), args=args,
                          train_dataset=dpo_data(12), processing_class=tok, target_dataset=dpo_data(2, off=20),
                          dr_method="global_subset", dr_options={"frac": 0.5})
        if mode == "precompute":
            assert tr.ref_model is None and {"ref_chosen_logps", "ref_rejected_logps"} <= set(
                tr.target_dataset.column_names)
        tr.train()
        runs[mode] = (_logged(tr, "dr/target_loss"), params(m))
    (tl_pre, p_pre), (tl_ref, p_ref) = runs["precompute"], runs["ref_model"]
    assert len(tl_pre) == 3
    assert abs(tl_pre[0] - math.log(2)) < 1e-5  # step 1: policy == reference (TRL: fp32 log-probs)
    assert all(abs(t - math.log(2)) > 1e-3 for t in tl_pre[1:])  # before the fix: ln 2 at every step
    assert tl_pre == pytest.approx(tl_ref, rel=1e-9, abs=1e-12)
    for n in p_pre:
        assert torch.allclose(p_pre[n], p_ref[n], rtol=1e-9, atol=1e-12), n


# --------------------------------------------------------------------------- TRL's own metrics
def _step_log(tr, step):
    return [h for h in tr.state.log_history if h.get("step") == step and "loss" in h][0]


def test_sft_logs_trl_metrics_like_plain_sft(tok, tmp_path):
    from trl import SFTConfig, SFTTrainer

    base = tiny(tok)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=0.5,
                     **COMMON)
    plain = SFTTrainer(model=copy.deepcopy(base), args=args, train_dataset=sft_data(8), processing_class=tok)
    plain.train()
    dr = DrSFTTrainer(model=copy.deepcopy(base), args=args, train_dataset=sft_data(8), processing_class=tok,
                      target_dataset=sft_data(3, off=20), dr_method="full_training")
    dr.train()
    for step in (1, 2):  # step 2 is computed after one (identical) update
        want, got = _step_log(plain, step), _step_log(dr, step)
        assert got["num_tokens"] == want["num_tokens"] > 0
        assert got["mean_token_accuracy"] == pytest.approx(want["mean_token_accuracy"], abs=1e-9)
        assert got["entropy"] == pytest.approx(want["entropy"], rel=1e-5)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert "dr/target_loss" in got


def test_dpo_logs_trl_metrics_like_plain_dpo(tok, tmp_path):
    from trl import DPOConfig, DPOTrainer

    base = tiny(tok)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=2.0,
                     beta=0.5, **COMMON)
    plain = DPOTrainer(model=copy.deepcopy(base), ref_model=copy.deepcopy(base), args=args,
                       train_dataset=dpo_data(8), processing_class=tok)
    plain.train()
    dr = DrDPOTrainer(model=copy.deepcopy(base), ref_model=copy.deepcopy(base), args=args,
                      train_dataset=dpo_data(8), processing_class=tok, target_dataset=dpo_data(3, off=20),
                      dr_method="full_training")
    dr.train()
    keys = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"]
    want, got = _step_log(plain, 2), _step_log(dr, 2)
    assert abs(want["rewards/margins"]) > 1e-4  # the policy has left the reference: the metrics carry signal
    for k in keys:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k
    assert got["num_tokens"] == want["num_tokens"] > 0
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


# --------------------------------------------------------------------------- one pass vs two passes
def _count_forwards(model):
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("kind,method", [("sft", "global_subset"), ("sft", "hull"), ("dpo", "global_subset")])
def test_global_one_pass_equals_two_pass(tok, tmp_path, kind, method):
    """Single process: a global-scope step runs one captured forward/backward and assembles .grad from the factors;
    dr_options assembly='two_pass' (DeepSpeed/FSDP's path) gives the same update, with accumulation and clipping."""
    from trl import DPOConfig, SFTConfig

    base = tiny(tok)
    before = params(base)
    out = {}
    for assembly in ("one_pass", "two_pass"):
        m = copy.deepcopy(base)
        kw = dict(output_dir=str(tmp_path / assembly), per_device_train_batch_size=4, max_steps=2,
                  learning_rate=0.5, gradient_accumulation_steps=2, **{**COMMON, "max_grad_norm": 0.05})
        opts = {"assembly": assembly, **({"frac": 0.5} if method == "global_subset" else {})}
        if kind == "sft":
            tr = DrSFTTrainer(model=m, args=SFTConfig(**kw), train_dataset=sft_data(16), processing_class=tok,
                              target_dataset=sft_data(3, off=20), dr_method=method, dr_options=opts)
        else:
            tr = DrDPOTrainer(model=m, ref_model=copy.deepcopy(base), args=DPOConfig(beta=0.5, **kw),
                              train_dataset=dpo_data(16), processing_class=tok, target_dataset=dpo_data(3, off=20),
                              dr_method=method, dr_options=opts)
        calls = _count_forwards(m)
        res = tr.train()
        assert len(calls) == (4 if assembly == "one_pass" else 8)  # 2 steps x 2 micro-batches x passes
        out[assembly] = (params(m), res.training_loss, _logged(tr, "grad_norm"))
    (p1, l1, g1), (p2, l2, g2) = out["one_pass"], out["two_pass"]
    assert any((p1[n] != before[n]).any() for n in before)
    assert g1[0] > 0.05  # clipping was active
    assert g1 == pytest.approx(g2, rel=1e-6)
    assert l1 == pytest.approx(l2, rel=1e-9)
    assert_same_update(before, p1, p2, rtol=1e-6)


# --------------------------------------------------------------------------- LM head on label positions only
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("method", ["global_subset", "layerwise_subset"])
def test_lm_head_on_label_positions_only_is_exact(tok, tmp_path, tie, method):
    """The adapter runs the LM head (logits_to_keep) only from the earliest label position on: the same update as the
    full head, tied or untied embeddings (two uses of one block with different lengths)."""
    from trl import SFTConfig

    base = tiny(tok, tie=tie)
    before = params(base)
    out = {}
    for trim in (True, False):
        m = copy.deepcopy(base)
        args = SFTConfig(output_dir=str(tmp_path / str(trim)), per_device_train_batch_size=4, max_steps=1,
                         learning_rate=0.5, **COMMON)
        tr = DrSFTTrainer(model=m, args=args, train_dataset=sft_data(8), processing_class=tok,
                          target_dataset=sft_data(3, off=20), dr_method=method, dr_options={"frac": 0.5})
        tr._dr_keep_ok = trim
        seen = []
        m.lm_head.register_forward_hook(lambda mod, inp, o, seen=seen: seen.append(inp[0].shape[1]))
        m.model.embed_tokens.register_forward_hook(lambda mod, inp, o, seen=seen: seen.append(-inp[0].shape[1]))
        tr.train()
        T = -seen[0]
        assert (seen[1] < T) if trim else (seen[1] == T)  # the head saw fewer positions than the embedding
        out[trim] = (params(m), _logged(tr, "mean_token_accuracy"), _logged(tr, "entropy"))
    assert_same_update(before, out[True][0], out[False][0], rtol=1e-9)
    assert out[True][1] == pytest.approx(out[False][1], abs=1e-12)
    assert out[True][2] == pytest.approx(out[False][2], rel=1e-9)
