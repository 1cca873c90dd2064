"""LESS (Xia et al. 2024): offline selection by Adam-preconditioned, projected LoRA gradient similarity.

1. Warm-up: LoRA on a random ``warmup_frac`` (5%) of the pool for ``epochs`` epochs, checkpointing the LoRA weights
   and AdamW moments after each epoch.
2. Per checkpoint, per-example gradient features (per-example token-mean loss): pool examples use the Adam direction
   ``m'/sqrt(v'+1e-8)`` with ``m' = 0.9 m + 0.1 g``, ``v' = 0.999 v + 0.001 g^2`` from that checkpoint's moments;
   target examples use plain gradients; both Rademacher-projected to ``proj_dim`` and L2-normalized.
3. Score of a pool example = sum over checkpoints of (epoch's mean learning rate) x cosine similarity, averaged over
   the target examples (one target subtask here, so the max over subtasks is that mean).
4. Keep the top ``select_frac`` of the pool; the caller trains on it with the shared recipe.
"""

from __future__ import annotations

import copy
import random

import torch

from drpost.data.collate import collate
from drpost.geometry.capture import Capture
from drpost.geometry.persample import per_sample_gradients
from drpost.trainers.sft import SFTRecipe, linear_schedule, prepare_model, sample_mean_loss


def _features(model, rows, pad, cap, transform, batch_size=64):
    """Per-example gradients, transformed batch by batch (never holds the (N, P) matrix)."""
    out = []
    for s in range(0, len(rows), batch_size):
        g = per_sample_gradients(model, collate(rows[s:s + batch_size], pad), sample_mean_loss, cap).float()
        out.append(transform(g))
    return torch.cat(out)


def less_scores(base_model, tokenizer, pool_rows: list[dict], target_rows: list[dict], *, warmup_frac=0.05,
                epochs=2, lr=1e-3, batch_size=8, lora_r=8, lora_alpha=32, proj_dim=256, seed=0) -> torch.Tensor:
    """(len(pool_rows),) LESS scores."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id or 0
    recipe = SFTRecipe(finetuning="lora", lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0)
    model = prepare_model(copy.deepcopy(base_model), recipe)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    warm = rng.sample(range(len(pool_rows)), max(batch_size, int(warmup_frac * len(pool_rows))))
    steps_per_epoch = max(1, len(warm) // batch_size)
    opt = torch.optim.AdamW(params, lr=lr)
    sched = linear_schedule(opt, epochs * steps_per_epoch, 0.03)
    checkpoints = []
    for _ in range(epochs):
        rng.shuffle(warm)
        lrs = []
        for s in range(steps_per_epoch):
            b = collate([pool_rows[i] for i in warm[s * batch_size:(s + 1) * batch_size]], pad)
            loss, counts = sample_mean_loss(model, b)
            (loss.sum() / counts.sum()).backward()
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        state = [opt.state[p] for p in params]
        checkpoints.append({
            "weights": [p.detach().clone() for p in params],
            "m": torch.cat([s["exp_avg"].reshape(-1) for s in state]),
            "v": torch.cat([s["exp_avg_sq"].reshape(-1) for s in state]),
            "lr": sum(lrs) / len(lrs),
        })
    model.eval()
    cap = Capture(model)
    n_params = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(seed)
    proj = (torch.randint(0, 2, (n_params, proj_dim), generator=gen).float() * 2 - 1) / proj_dim**0.5
    # Capture orders parameters by block; reorder the moments to match
    order = [p for b in cap.blocks for p in b.params]
    index = {id(p): i for i, p in enumerate(params)}
    scores = torch.zeros(len(pool_rows))
    for ck in checkpoints:
        with torch.no_grad():
            for p, w in zip(params, ck["weights"], strict=True):
                p.copy_(w)
        sizes = [p.numel() for p in params]
        m_parts = dict(zip(range(len(params)), torch.split(ck["m"], sizes), strict=True))
        v_parts = dict(zip(range(len(params)), torch.split(ck["v"], sizes), strict=True))
        m = torch.cat([m_parts[index[id(p)]] for p in order])
        v = torch.cat([v_parts[index[id(p)]] for p in order])
        def plain(g):
            return torch.nn.functional.normalize(g @ proj, dim=1)

        def adam(g, m=m, v=v):
            return plain((0.9 * m + 0.1 * g) / torch.sqrt(0.999 * v + 0.001 * g**2 + 1e-8))

        f_t = _features(model, target_rows, pad, cap, plain)  # (m, proj_dim) plain gradients
        f_p = _features(model, pool_rows, pad, cap, adam)  # (N, proj_dim) Adam-preconditioned
        scores += ck["lr"] * (f_p @ f_t.t()).mean(1)
    return scores


def less_select(scores: torch.Tensor, select_frac: float) -> list[int]:
    k = max(1, int(round(select_frac * scores.numel())))
    return torch.topk(scores, k).indices.tolist()
