"""``DrGRPOTrainer``'s target rows: generated in TRL's own generate call (one call per generation batch, not one more
for the target prompts), split off its output and scored on their own, so the general groups' advantages are TRL's
for the general rows alone and the target groups get their own group-relative advantages.

Tiny float64 Llama from a config, drpost's offline byte tokenizer: no downloads.
Run: ``.venv/bin/pytest -q tests/integrations/test_trl_grpo.py``
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("trl")

from drpost import DataRegularizer  # noqa: E402
from drpost.integrations.trl import DrGRPOTrainer  # noqa: E402
from drpost.world.tokenizer import build_tokenizer  # noqa: E402
from tests.integrations.test_trl import grpo_args, reward_len, tiny  # noqa: E402
from tests.integrations.trl_data import params, prompts  # noqa: E402

G = 4


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _trainer(tok, tmp_path, reward=reward_len, n_target=3, dr_method="global_subset", **kw):
    args = grpo_args(tmp_path, **{"max_steps": 1, "num_generations": G, "per_device_train_batch_size": 8, **kw})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = DrGRPOTrainer(model=tiny(tok), reward_funcs=reward, args=args, train_dataset=prompts(8),
                           processing_class=tok, target_dataset=prompts(n_target, off=10),
                           dr_method=dr_method, dr_options={"frac": 0.5})
    return tr


def _count_generate(model):
    """Wrap ``model.generate`` (the unwrapped model TRL generates with) to count its calls and rows."""
    calls = []
    inner = model.generate

    def generate(*a, **kw):
        calls.append(int(kw["input_ids"].shape[0]))
        return inner(*a, **kw)

    model.generate = generate
    return calls


def _expected_advantages(tok, batch):
    """TRL's group-relative advantages recomputed from the batch itself: rows grouped by prompt text, reward_len of
    each decoded completion, (r - group mean) / (group std + 1e-4)."""
    p_text = tok.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
    c_text = tok.batch_decode(batch["completion_ids"], skip_special_tokens=True)
    r = torch.tensor(reward_len(c_text), dtype=torch.float64)
    adv = torch.empty_like(r)
    for p in set(p_text):
        idx = torch.tensor([i for i, q in enumerate(p_text) if q == p])
        assert len(idx) == G, "a group is not whole"
        adv[idx] = (r[idx] - r[idx].mean()) / (r[idx].std() + 1e-4)
    return p_text, adv


def test_target_rows_share_the_generate_call_and_keep_their_own_groups(tok, tmp_path):
    tr = _trainer(tok, tmp_path)
    tr.model.train()
    calls = _count_generate(tr.model)
    general_raw = [{"prompt": p} for p in prompts(2)["prompt"] for _ in range(G)]
    torch.manual_seed(1)
    general = tr._prepare_inputs(general_raw)
    target = tr._dr_next_target()
    p_gen, want_gen = _expected_advantages(tok, general)
    p_tgt, want_tgt = _expected_advantages(tok, target)
    assert set(p_gen) == set(prompts(2)["prompt"])  # no target row among the general rows ...
    assert len(set(p_tgt)) == 1 and set(p_tgt) <= set(prompts(3, off=10)["prompt"])  # ... nor the reverse
    assert general["completion_ids"].shape[0] == 2 * G and target["completion_ids"].shape[0] == G
    assert calls == [2 * G + G]  # one generate call: 2 general groups + 1 target group
    torch.testing.assert_close(general["advantages"].double(), want_gen, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(target["advantages"].double(), want_tgt, rtol=1e-5, atol=1e-6)
    assert float(target["advantages"].abs().sum()) > 0  # the target completions were generated and scored

    # the target objective is live: target_only's update is the target rows' own gradient, and it is nonzero
    tr.current_gradient_accumulation_steps = 1
    tr.dr_method, tr.dr_options = "target_only", {}
    tr.regularizer = DataRegularizer(tr.model, method="target_only")
    tr.model.zero_grad(set_to_none=True)
    tr._dr_backward(tr.model, tr._dr_rows(general, tr.model, target=False), tr._dr_rows(target, tr.model, True))
    assert tr.dr_last_report.target_loss == tr.dr_last_report.target_loss
    assert sum(float(p.grad.abs().sum()) for p in tr.model.parameters() if p.grad is not None) > 0


def test_target_rows_cut_per_micro_step_with_gradient_accumulation(tok, tmp_path):
    """steps_per_generation = 2 micro-steps per generation: one generate call serves both micro-steps' general and
    target rows; each micro-step trains on its own target group."""
    tr = _trainer(tok, tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    calls = _count_generate(tr.model)
    seen = []
    inner = tr._dr_next_target

    def record():
        t = inner()
        seen.append(tuple(tok.batch_decode(t["prompt_ids"], skip_special_tokens=True)))
        return t

    tr._dr_next_target = record
    before = params(tr.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.train()
    assert calls == [2 * 4 + 2 * G]  # 8 general rows (2 micro-steps x 4) + 2 target groups, in one call
    assert len(seen) == 2 and all(len(set(s)) == 1 and len(s) == G for s in seen)
    assert seen[0][0] != seen[1][0]  # each micro-step its own target prompt
    after = params(tr.model)
    assert any((after[n] != before[n]).any() for n in before)


def test_unshareable_call_falls_back_to_a_separate_target_generation(tok, tmp_path, monkeypatch):
    """Where the prompts cannot share TRL's call (a rollout_func, images, vLLM server mode with groups spanning
    ranks; here forced), the target rows are generated in a call of their own, and still scored on their own."""
    tr = _trainer(tok, tmp_path)
    tr.model.train()
    calls = _count_generate(tr.model)
    monkeypatch.setattr(tr, "_dr_can_share", lambda *a, **kw: False)
    torch.manual_seed(1)
    general = tr._prepare_inputs([{"prompt": p} for p in prompts(2)["prompt"] for _ in range(G)])
    target = tr._dr_next_target()
    assert calls == [2 * G, G]
    for batch in (general, target):
        torch.testing.assert_close(batch["advantages"].double(), _expected_advantages(tok, batch)[1],
                                   rtol=1e-5, atol=1e-6)
