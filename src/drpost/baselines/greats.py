"""GREATS (Wang et al. 2024): online batch selection by a greedy second-order alignment rule, official update.

Selection (unchanged, the official rule): per-sample gradients of the per-sample token-mean loss
``l_i / N_i`` on a candidate batch (2n here), scores against the target gradient and their Gram, then greedy
selection (``DataRegularizer(method="global_subset", selection="greedy")``: pick the best ``lr s_i``, subtract
``lr^2 K_{i, pick}`` from the rest) of ``round(frac x candidates)`` samples.

Update (the official one): plain training on the kept rows with the **token mean over the kept batch**,
``d = grad sum_{i in S} l_i / N_S`` (``N_S`` = loss tokens of the kept rows), by an ordinary second forward/backward
of the kept rows. Earlier releases trained on the mean of the kept rows' per-sample token-mean losses,
``(1/|S|) sum_{i in S} grad l_i / N_i``, which weights short rows more.
"""

from __future__ import annotations

import torch

from drpost.objectives.sft import causal_lm_loss
from drpost.step import StepReport, take_rows


def sample_mean_loss(model, batch):
    """Per-sample token-mean loss (GREATS's selection loss): row loss / its tokens, count 1."""
    loss, counts = causal_lm_loss(model, batch)
    return loss / counts.clamp_min(1), torch.ones_like(counts)


def greats_step(reg, model, general: dict, target: dict, lr: float | None = None) -> StepReport:
    """One GREATS step: select with ``reg`` (a global-scope subset regularizer) on the per-sample token-mean loss,
    then write ``.grad`` = gradient of the token-mean loss of the kept general rows (one row per sample).

    The report is in the regularizer's usual units: ``scores`` (n,) = <u_i, g_T> of the summed-loss gradients
    (the selection's per-token scores times N_i), ``counts`` (n,) the rows' loss tokens, ``weights`` (1, n) =
    1 / N_S on the kept rows, 0 elsewhere (coefficients of u_i in the update).
    """
    c, report = reg.row_weights(general, target, sample_mean_loss, lr)  # c: (R_g + R_t,) global scope
    if c is None or report.skipped:
        return report
    if c.dim() != 1:
        raise ValueError("GREATS needs a global-scope subset method (one selection for the whole model)")
    R_g = general["input_ids"].shape[0]
    keep = torch.nonzero(c[:R_g] != 0).flatten()  # (|S|,) kept general rows
    dev = next(model.parameters()).device
    shifted = torch.nn.functional.pad(general["labels"][:, 1:], (0, 1), value=-100)
    counts = (shifted != -100).sum(1).to(torch.float32)  # (R_g,) loss tokens per row (as causal_lm_loss counts)
    if keep.numel() == 0:
        report.weights = torch.zeros(1, R_g)
    else:
        batch = {k: v.to(dev) for k, v in take_rows(general, keep.to(general["input_ids"].device)).items()}
        sums, n_tok = causal_lm_loss(model, batch)  # (|S|,), (|S|,)
        (sums.sum() / n_tok.sum().clamp_min(1)).backward()  # .grad += token-mean gradient over the kept batch
        w = torch.zeros(1, R_g)
        w[0, keep.cpu()] = 1.0 / float(n_tok.sum().clamp_min(1))
        report.weights = w
    if report.scores is not None:
        report.scores = report.scores.detach().cpu().float() * counts
    report.counts = counts
    return report
