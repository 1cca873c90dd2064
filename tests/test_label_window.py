"""The LM head on label positions only (``objectives.sft.causal_lm_loss`` with ``logits_to_keep``): the same loss
and gradients as full logits, checked against a loss computed by hand from the full (R, T, V) logits in float64,
on prompt-masked chat-like rows (the window is really shorter than the rows) and on rows the window cannot
shorten."""

import copy

import pytest
import torch

from drpost.data.collate import collate
from drpost.objectives.sft import accepts_logits_to_keep, causal_lm_loss, label_window


def full_logits_loss(model, batch):
    """Oracle: per-row summed cross-entropy from the logits at every position (no window)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (R, T, V)
    logp = torch.log_softmax(logits[:, :-1].double(), -1)  # (R, T-1, V): position t scores token t+1
    target = batch["labels"][:, 1:]
    mask = target != -100
    picked = logp.gather(-1, target.clamp_min(0)[..., None])[..., 0] * mask
    return -picked.sum(-1), mask.sum(-1)


def rows(prompts, completions):
    out = []
    for p, c in zip(prompts, completions, strict=True):
        ids = list(range(5, 5 + p + c))
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


@pytest.fixture(scope="module")
def micro():
    from drpost.world.arch import build_model

    return build_model("micro", seed=0).double()


@pytest.mark.parametrize("lora", [False, True])
def test_window_gives_the_full_logits_loss_and_gradients(micro, lora):
    model = copy.deepcopy(micro)
    if lora:
        from drpost.trainers.sft import SFTRecipe, prepare_model

        model = prepare_model(model, SFTRecipe(finetuning="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05)
    batch = collate(rows([7, 4, 9, 6], [3, 5, 2, 4]), pad_id=0)  # right-padded, prompts of 4..9 tokens
    assert accepts_logits_to_keep(model) and label_window(batch["labels"]) == 11 - 3  # T = 11: positions 3..10
    params = [p for p in model.parameters() if p.requires_grad]
    got, n_got = causal_lm_loss(model, batch)
    ref, n_ref = full_logits_loss(model, batch)
    assert torch.equal(n_got.long(), n_ref) and torch.allclose(got, ref, rtol=1e-10, atol=1e-12)
    g_got = torch.autograd.grad(got.sum(), params)
    g_ref = torch.autograd.grad(full_logits_loss(model, batch)[0].sum(), params)
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(g_got, g_ref, strict=True))


def test_window_is_the_whole_row_when_the_second_token_is_scored():
    labels = torch.tensor([[-100, 4, 5, -100], [-100, -100, -100, 6]])
    assert label_window(labels) == 4  # position 0 scores token 1 of row 0
    assert label_window(torch.tensor([[-100, -100, 7]])) == 2
    assert label_window(torch.full((2, 3), -100)) == 3  # nothing to score: no window


def test_a_forward_without_logits_to_keep_gets_full_logits(micro):
    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    batch = collate(rows([6, 8], [2, 3]), pad_id=0)
    wrapped = Wrapped(micro)
    assert not accepts_logits_to_keep(wrapped)
    assert torch.allclose(causal_lm_loss(wrapped, batch)[0], full_logits_loss(micro, batch)[0], rtol=1e-10)
