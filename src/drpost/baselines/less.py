"""LESS (Xia et al. 2024): offline selection by Adam-preconditioned LoRA gradient similarity to the target.

1. Warm-up: LoRA on a random ``warmup_frac`` (5%, the official default) of the pool for ``epochs`` epochs (default 4,
   the official 4 epochs / 4 checkpoints), checkpointing the LoRA weights and AdamW moments after each epoch.
2. Per checkpoint, per-example gradients of the per-example token-mean loss: pool examples use the Adam direction
   ``m'/sqrt(v'+1e-8)`` with ``m' = 0.9 m + 0.1 g``, ``v' = 0.999 v + 0.001 g^2`` from that checkpoint's moments;
   target examples use plain gradients.
3. Features (``proj_dim``): None (default) = the exact gradients, so the similarity is the exact cosine
   ``cos(a_i, g_j) = <a_i, g_j> / (||a_i|| ||g_j||)``, computed pool batch by pool batch against the few target
   rows ``(m, P)`` (never an ``(N, P)`` matrix); an integer k = a seeded count-sketch projection to k dims (each
   coordinate hashed to one of k buckets with a random sign: an unbiased sparse JL map, O(P) memory, never a dense
   ``P x k`` matrix), then the cosine of the sketches (the official code uses k = 8,192 with a dense projector).
4. Score of pool example i = sum over checkpoints c of lr_c x mean_j cos(a_i^c, g_j^c) (lr_c = the epoch's mean
   learning rate; one target task here, so the official max over tasks is that mean).
5. ``less_select`` keeps the top ``select_frac`` of the scored rows; the caller trains on them with the shared recipe.
"""

from __future__ import annotations

import copy
import random

import torch

from drpost.baselines.greats import sample_mean_loss
from drpost.data.collate import collate
from drpost.geometry.capture import Capture
from drpost.geometry.persample import per_sample_gradients
from drpost.trainers.loop import warmup_linear


class CountSketch:
    """Seeded count-sketch projection R^P -> R^k: ``(x S)_b = sum_{p: h(p) = b} sign(p) x_p`` (E[<xS, yS>] = <x, y>).
    Memory O(P) (a bucket and a sign per coordinate), cost O(rows x P) per application."""

    def __init__(self, n_params: int, k: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.k = k
        self.bucket = torch.randint(0, k, (n_params,), generator=gen)  # (P,)
        self.sign = torch.randint(0, 2, (n_params,), generator=gen).float() * 2 - 1  # (P,)

    def __call__(self, g: torch.Tensor) -> torch.Tensor:  # (B, P) -> (B, k)
        out = torch.zeros(g.shape[0], self.k, dtype=g.dtype)
        return out.index_add_(1, self.bucket, g * self.sign.to(g.dtype))


def _batch(model, rows: list[dict], pad: int) -> dict:
    """The padded batch of ``rows`` on the model's device."""
    dev = next(model.parameters()).device
    return {k: v.to(dev) for k, v in collate(rows, pad).items()}


def _features(model, rows, pad, cap, transform, batch_size=64):
    """Per-example gradients, transformed batch by batch: yields (B, F) feature blocks (never the (N, P) matrix)."""
    for s in range(0, len(rows), batch_size):
        g = per_sample_gradients(model, _batch(model, rows[s:s + batch_size], pad), sample_mean_loss, cap)  # (B, P)
        yield transform((g.float() if g.dtype in (torch.float16, torch.bfloat16) else g).cpu())


def _warmup(model, params, pool_rows, pad, rng, *, warmup_frac, epochs, lr, batch_size) -> list[dict]:
    """LoRA warm-up on a random warmup_frac of the pool; one checkpoint (weights, Adam moments, mean lr) per epoch."""
    warm = rng.sample(range(len(pool_rows)), max(batch_size, int(warmup_frac * len(pool_rows))))
    steps_per_epoch = max(1, len(warm) // batch_size)
    opt = torch.optim.AdamW(params, lr=lr)
    sched = warmup_linear(opt, epochs * steps_per_epoch, 0.03)
    checkpoints = []
    for _ in range(epochs):
        rng.shuffle(warm)
        lrs = []
        for s in range(steps_per_epoch):
            b = _batch(model, [pool_rows[i] for i in warm[s * batch_size:(s + 1) * batch_size]], pad)
            loss, counts = sample_mean_loss(model, b)
            (loss.sum() / counts.sum()).backward()
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        state = [opt.state[p] for p in params]  # empty for a parameter the warm-up never reached: zero moments
        checkpoints.append({"weights": [p.detach().clone() for p in params],
                            "m": [s["exp_avg"].detach().clone() if s else torch.zeros_like(p)
                                  for p, s in zip(params, state, strict=True)],
                            "v": [s["exp_avg_sq"].detach().clone() if s else torch.zeros_like(p)
                                  for p, s in zip(params, state, strict=True)],
                            "lr": sum(lrs) / len(lrs)})
    return checkpoints


def checkpoint_cosines(model, cap, params, m_list, v_list, pool_rows, target_rows, pad, sketch=None,
                       score_batch=64) -> torch.Tensor:
    """(N,) float64 ``mean_j cos(a_i, g_j)`` at the model's current weights: ``a_i`` the Adam direction of pool row
    i's gradient under moments ``m_list`` / ``v_list`` (one tensor per parameter of ``params``), ``g_j`` target row
    j's plain gradient; exact (``sketch=None``) or of their count sketches. Pool rows go ``score_batch`` at a time
    against the ``(m, F)`` target features: no ``(N, P)`` matrix is held."""
    index = {id(p): i for i, p in enumerate(params)}
    order = [p for b in cap.blocks for p in b.params]  # per_sample_gradients' column order (by block)
    m = torch.cat([m_list[index[id(p)]].reshape(-1) for p in order]).cpu()  # (P,) in capture order
    v = torch.cat([v_list[index[id(p)]].reshape(-1) for p in order]).cpu()  # (P,)

    def unit(g):  # (B, P) -> (B, F) L2-normalized features (F = P exact, or the sketch size)
        return torch.nn.functional.normalize(g if sketch is None else sketch(g), dim=1)

    def adam(g):  # (B, P) Adam update direction of each example
        mm, vv = m.to(g.dtype), v.to(g.dtype)
        return (0.9 * mm + 0.1 * g) / torch.sqrt(0.999 * vv + 0.001 * g**2 + 1e-8)

    f_t = torch.cat(list(_features(model, target_rows, pad, cap, unit, score_batch)))  # (m, F) plain gradients
    out = [(f_p @ f_t.t()).mean(1).double()  # (B,) mean cosine over the target rows
           for f_p in _features(model, pool_rows, pad, cap, lambda g: unit(adam(g)), score_batch)]
    return torch.cat(out)


def less_scores(base_model, tokenizer, pool_rows: list[dict], target_rows: list[dict], *, warmup_frac=0.05,
                epochs=4, lr=1e-3, batch_size=8, lora_r=8, lora_alpha=32, proj_dim: int | None = None, seed=0,
                score_batch=64) -> torch.Tensor:
    """(len(pool_rows),) LESS scores of every pool row (module docstring): ``epochs`` lr-weighted checkpoints,
    exact cosine (``proj_dim=None``) or count-sketch features of ``proj_dim`` dims (8,192 = the official size)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id or 0
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                     task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base_model), cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    checkpoints = _warmup(model, params, pool_rows, pad, rng, warmup_frac=warmup_frac, epochs=epochs, lr=lr,
                          batch_size=batch_size)
    model.eval()
    cap = Capture(model)
    sketch = None if proj_dim is None else CountSketch(sum(p.numel() for p in params), int(proj_dim), seed)

    scores = torch.zeros(len(pool_rows), dtype=torch.float64)
    for ck in checkpoints:
        with torch.no_grad():
            for p, w in zip(params, ck["weights"], strict=True):
                p.copy_(w)
        scores += ck["lr"] * checkpoint_cosines(model, cap, params, ck["m"], ck["v"], pool_rows, target_rows, pad,
                                                sketch, score_batch)
    return scores.float()


def less_select(scores: torch.Tensor, select_frac: float) -> list[int]:
    k = max(1, int(round(select_frac * scores.numel())))
    return torch.topk(scores, k).indices.tolist()
