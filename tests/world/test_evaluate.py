"""Evaluation: greedy decoding agrees with Hugging Face generate; exact match and loss on the micro model."""

from __future__ import annotations

import math

import torch

from drpost.data.collate import collate, tokenize_prompt_completion
from drpost.objectives.sft import causal_lm_loss
from drpost.world.evaluate import eval_loss, exact_match, exact_match_by_family, greedy_generate, predict
from drpost.world.tasks import generate_examples


def test_greedy_matches_hf_generate(micro):
    model, tok = micro
    ex = generate_examples(6, seed=11)
    ours = greedy_generate(model, tok, [e["prompt"] for e in ex], max_new_tokens=6)  # batched, left-padded
    for e, text in zip(ex, ours):
        ids = torch.tensor([tok.encode(e["prompt"], add_special_tokens=False)])
        out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == text


class _Oracle(torch.nn.Module):
    """A fake LM that emits a fixed token sequence (the answer of a single example), to test scoring."""

    def __init__(self, ids):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.ids, self.t = ids, 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        self.t = 0 if past_key_values is None else self.t + 1
        B, T = input_ids.shape
        logits = torch.zeros(B, T, 259)
        logits[:, -1, self.ids[min(self.t, len(self.ids) - 1)]] = 1.0
        return type("O", (), {"logits": logits, "past_key_values": "cache"})()


def test_exact_match_scores_the_true_answer(micro):
    _, tok = micro
    e = generate_examples(1, ["add"], noise=0.0, seed=2)[0]
    oracle = _Oracle(tok.encode(e["answer"], add_special_tokens=False) + [tok.eos_token_id])
    assert exact_match(oracle, tok, [e]) == 1.0
    noisy = {**e, "completion": e["answer"] + "9", "noisy": True}
    assert exact_match(oracle, tok, [noisy]) == 1.0  # scored on the truth, not the noisy label
    wrong = _Oracle(tok.encode("x", add_special_tokens=False) + [tok.eos_token_id])
    assert exact_match(wrong, tok, [e]) == 0.0


def test_exact_match_and_loss_on_micro(micro):
    model, tok = micro
    ex = generate_examples(40, seed=4)
    em = exact_match(model, tok, ex, batch_size=16)
    assert 0.0 <= em <= 1.0
    by = exact_match_by_family(model, tok, ex)
    assert set(by) == {e["family"] for e in ex}
    assert len(predict(model, tok, ex[:5])) == 5
    loss = eval_loss(model, tok, ex, batch_size=16)
    rows = [tokenize_prompt_completion(tok, e["prompt"], e["completion"]) for e in ex]
    with torch.no_grad():
        s, c = causal_lm_loss(model, collate(rows, pad_id=tok.pad_token_id))
    assert math.isfinite(loss) and abs(loss - float(s.sum() / c.sum())) < 1e-4
    assert model.training is False
