"""Wrappers around the model's forward that the adapters' loss functions run through: the LM head on label
positions only (``logits_to_keep``, as TRL's fused LM head does) and the logit tap that computes TRL's token metrics
(entropy, accuracy, mean logit, label log-prob) from pass 1's logits."""

from __future__ import annotations

import torch
from torch import Tensor

from drpost.objectives.sft import label_window


# --------------------------------------------------------------------------- LM head on label positions only
class _FullInputs(torch.nn.Module):
    """Runs ``model`` on the full ``input_ids`` / ``attention_mask`` (R, T) with ``logits_to_keep=k`` (Hugging Face
    causal LMs: the LM head projects only the last ``k`` positions, logits (R, k, V)), whatever trimmed inputs the
    loss passes in."""

    def __init__(self, model, input_ids: Tensor, attention_mask: Tensor | None, keep: int):
        super().__init__()
        self.inner = model
        self.ids, self.mask, self.keep = input_ids, attention_mask, keep

    def forward(self, **kw):
        kw = {k: v for k, v in kw.items() if k not in ("input_ids", "attention_mask")}
        return self.inner(input_ids=self.ids, attention_mask=self.mask, logits_to_keep=self.keep, **kw)


def _label_positions_only(loss_fn):
    """``loss_fn`` with the LM head run only from the position before the batch's earliest label token onward (the
    prompt columns that precede every row's completion get no logits): the model still sees the full rows, the loss
    sees the last ``k`` columns of every per-token (R, T) tensor of the batch (labels, token-aligned log-probs, ...),
    whose first column carries no label. Same loss and gradient; less LM-head work and no (R, T, V) logits. TRL's
    plain trainers do the same with their fused LM head."""

    def fn(model, batch):
        labels = batch["labels"]  # (R, T)
        R, T = labels.shape
        keep = label_window(labels)  # logits of positions first_label - 1 .. T - 1
        if keep >= T:
            return loss_fn(model, batch)
        trimmed = {k: (v[:, T - keep:] if isinstance(v, Tensor) and v.dim() >= 2 and tuple(v.shape[:2]) == (R, T)
                       else v) for k, v in batch.items()}
        return loss_fn(_FullInputs(model, batch["input_ids"], batch.get("attention_mask"), keep), trimmed)

    return fn


# --------------------------------------------------------------------------- logit tap for TRL's metrics
class _Tap(torch.nn.Module):
    """Calls ``model`` and hands its logits (R, T, V), detached, to ``fn`` before returning the output unchanged."""

    def __init__(self, model, fn):
        super().__init__()
        self.inner = model
        self.fn = fn

    def forward(self, **kw):
        out = self.inner(**kw)
        with torch.no_grad():
            self.fn((out.logits if hasattr(out, "logits") else out[0]).detach())
        return out


def _token_stats(logits: Tensor, labels: Tensor, max_elems: int = 1 << 22) -> dict[str, Tensor]:
    """Per-row sums over each row's loss tokens (shifted ``labels != -100``), in fp32, a few rows at a time so no
    second full (R, T, V) tensor is held: ``valid`` tokens, ``entropy``, ``correct`` (top-1 == label), ``logits``
    (mean logit over the vocabulary), ``logp`` (log-prob of the label). logits (R, T, V), labels (R, T) -> each (R,)."""
    cols = torch.nonzero((labels[:, 1:] != -100).any(0)).flatten()
    if cols.numel():  # leading columns without a label in any row carry nothing
        logits, labels = logits[:, int(cols[0]):], labels[:, int(cols[0]):]
    R, T, V = logits.shape
    step = max(1, max_elems // max(1, (T - 1) * V))
    parts: dict[str, list[Tensor]] = {k: [] for k in ("valid", "entropy", "correct", "logits", "logp")}
    for r0 in range(0, R, step):
        lg = logits[r0:r0 + step, :-1].float()  # (r, T-1, V)
        lab = labels[r0:r0 + step, 1:]  # (r, T-1)
        mask = lab != -100
        logp = lg.log_softmax(-1)
        tok = logp.gather(-1, lab.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (r, T-1)
        parts["valid"].append(mask.sum(-1).float())
        parts["entropy"].append((-(logp.exp() * logp).sum(-1) * mask).sum(-1))
        parts["correct"].append(((lg.argmax(-1) == lab) & mask).sum(-1).float())
        parts["logits"].append((lg.mean(-1) * mask).sum(-1))
        parts["logp"].append((tok * mask).sum(-1))
    return {k: torch.cat(v) for k, v in parts.items()}


def _tapped(loss_fn, rows: int, stats: dict):
    """``loss_fn`` whose first call also fills ``stats`` with :func:`_token_stats` of the batch's first ``rows``
    rows (the general rows of a merged batch); later calls (a second pass) run ``loss_fn`` untouched."""

    def fn(model, batch):
        if stats:
            return loss_fn(model, batch)
        labels = batch["labels"][:rows]
        return loss_fn(_Tap(model, lambda logits: stats.update(_token_stats(logits[:rows], labels))), batch)

    return fn
