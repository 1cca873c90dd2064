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

Cost: one forward and backward per pool row per checkpoint (4 x 4,000 row passes for a real-model pool: hours on a
CPU). Rows are batched in length order (little padding), the LM head runs only from the first position a loss
token is read at (``objectives.sft.causal_lm_loss``: prompt positions get no vocabulary-wide logits), and a
``CheckpointStore`` keeps each finished checkpoint's cosines on disk, so that an interrupted scoring resumes at the
checkpoint it was on.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from pathlib import Path

import torch

from drpost.baselines.greats import sample_mean_loss
from drpost.data.collate import collate
from drpost.geometry.capture import Capture
from drpost.geometry.persample import per_sample_gradient_blocks
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
        return self.add_(torch.zeros(g.shape[0], self.k, dtype=g.dtype), g, 0)

    def add_(self, out: torch.Tensor, part: torch.Tensor, offset: int) -> torch.Tensor:
        """``out`` (B, k) += the sketch of coordinates ``offset .. offset + P_b`` given as ``part`` (B, P_b)."""
        cols = slice(offset, offset + part.shape[1])
        return out.index_add_(1, self.bucket[cols], part * self.sign[cols].to(part.dtype))


def _batch(model, rows: list[dict], pad: int) -> dict:
    """The padded batch of ``rows`` on the model's device."""
    dev = next(model.parameters()).device
    return {k: v.to(dev) for k, v in collate(rows, pad).items()}


def _parts(model, rows, pad, cap):
    """Per-example gradients of one batch of ``rows``, part by part (``per_sample_gradient_blocks``): yields
    (column offset, (B, P_b) part on the CPU, fp32 or wider)."""
    off = 0
    for g in per_sample_gradient_blocks(model, _batch(model, rows, pad), sample_mean_loss, cap):
        yield off, (g.float() if g.dtype in (torch.float16, torch.bfloat16) else g).cpu()
        off += g.shape[1]


def _target_features(model, rows, pad, cap, sketch, batch_size) -> torch.Tensor:
    """(m, F) L2-normalized features of the target rows' plain gradients (F = P exact, or the sketch size)."""
    feats = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        if sketch is None:
            feats.append(torch.cat([g for _, g in _parts(model, chunk, pad, cap)], 1))  # (B, P)
            continue
        acc = None
        for off, g in _parts(model, chunk, pad, cap):
            acc = sketch.add_(torch.zeros(len(chunk), sketch.k, dtype=g.dtype) if acc is None else acc, g, off)
        feats.append(acc)  # (B, k)
    return torch.nn.functional.normalize(torch.cat(feats), dim=1)


def _pool_cosines(model, rows, pad, cap, f_t, m, v, sketch, batch_size):
    """Yields (B,) float64 ``mean_j cos(a_i, g_j)`` batch by batch, reduced part by part: the Adam direction
    ``a_i`` of each part goes into the dot products with the unit target features ``f_t`` (m, F) and the squared
    norms (exact), or into the sketch; neither the (B, P) gradients nor their Adam directions are ever held."""
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        dots = sq = acc = None
        for off, g in _parts(model, chunk, pad, cap):  # g: (B, P_b)
            cols = slice(off, off + g.shape[1])
            mm, vv = m[cols].to(g.dtype), v[cols].to(g.dtype)
            a = (0.9 * mm + 0.1 * g) / torch.sqrt(0.999 * vv + 0.001 * g * g + 1e-8)  # (B, P_b) Adam direction
            if sketch is not None:
                acc = sketch.add_(torch.zeros(len(chunk), sketch.k, dtype=a.dtype) if acc is None else acc, a, off)
                continue
            d, q = a @ f_t[:, cols].to(a.dtype).t(), a.square().sum(1)  # (B, m), (B,)
            dots, sq = (d, q) if dots is None else (dots + d, sq + q)
        if sketch is None:
            cos = dots / sq.sqrt().clamp_min(1e-12)[:, None]  # F.normalize's eps: the same cosine
        else:
            cos = torch.nn.functional.normalize(acc, dim=1) @ f_t.to(acc.dtype).t()
        yield cos.mean(1).double()


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

    f_t = _target_features(model, target_rows, pad, cap, sketch, score_batch)  # (m, F) plain gradients, unit
    order = sorted(range(len(pool_rows)), key=lambda i: len(pool_rows[i]["input_ids"]))  # batches of like lengths
    cos = torch.cat(list(_pool_cosines(model, [pool_rows[i] for i in order], pad, cap, f_t, m, v, sketch,
                                       score_batch)))  # (N,) in length order
    out = torch.empty_like(cos)
    out[torch.tensor(order, dtype=torch.long)] = cos
    return out


class CheckpointStore:
    """Each finished checkpoint's cosines on disk (``<directory>/<name>__ck<c>.json``), so that scoring a large pool
    spans interruptions: a file is used only if it was made with the same settings and data (``key``) and from the
    same warm-up checkpoint (its weights' fingerprint, relative tolerance 1e-5: a rerun warm-up on another thread
    count differs in rounding only); otherwise the checkpoint is scored again and the file replaced."""

    def __init__(self, directory: str | Path, name: str):
        self.directory, self.name = Path(directory), name
        self.warmup_seconds = 0.0

    def _path(self, c: int) -> Path:
        return self.directory / f"{self.name}__ck{c}.json"

    def load(self, c: int, key: dict, fingerprint: float) -> torch.Tensor | None:
        path = self._path(c)
        if not path.exists():
            return None
        saved = json.loads(path.read_text())
        if saved["key"] != key or abs(saved["fingerprint"] - fingerprint) > 1e-5 * abs(fingerprint):
            return None
        return torch.tensor(saved["cosines"], dtype=torch.float64)

    def save(self, c: int, key: dict, fingerprint: float, lr: float, cos: torch.Tensor, seconds: float) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self._path(c).with_suffix(".tmp")
        tmp.write_text(json.dumps({"name": self.name, "checkpoint": c, "lr": lr, "key": key,
                                   "fingerprint": fingerprint, "seconds": seconds,
                                   "warmup_seconds": self.warmup_seconds,
                                   "cosines": [float(f"{x:.9g}") for x in cos.tolist()]}))
        tmp.replace(self._path(c))

    def _saved(self, epochs: int) -> list[dict] | None:
        files = [self._path(c) for c in range(epochs)]
        return [json.loads(f.read_text()) for f in files] if all(f.exists() for f in files) else None

    def finished(self, key: dict, epochs: int) -> list[tuple[float, torch.Tensor]] | None:
        """(lr_c, cosines_c) of every checkpoint when all ``epochs`` are on disk with this ``key`` (no warm-up is
        needed then), else None."""
        saved = self._saved(epochs)
        if saved is None or any(s["key"] != key for s in saved):
            return None
        return [(s["lr"], torch.tensor(s["cosines"], dtype=torch.float64)) for s in saved]

    def seconds(self) -> float | None:
        """Scoring cost as measured when each checkpoint was scored (warm-up once + every checkpoint), or None
        while a checkpoint is missing."""
        first = self._path(0)
        saved = self._saved(json.loads(first.read_text())["key"]["epochs"]) if first.exists() else None
        return None if saved is None else max(s["warmup_seconds"] for s in saved) + sum(s["seconds"] for s in saved)


def _data_hash(rows: list[dict]) -> str:
    h = hashlib.sha1()
    for r in rows:
        h.update(json.dumps([r["input_ids"], r.get("labels")]).encode())
    return h.hexdigest()[:16]


def less_scores(base_model, tokenizer, pool_rows: list[dict], target_rows: list[dict], *, warmup_frac=0.05,
                epochs=4, lr=1e-3, batch_size=8, lora_r=8, lora_alpha=32, proj_dim: int | None = None, seed=0,
                score_batch=64, store: CheckpointStore | None = None) -> torch.Tensor:
    """(len(pool_rows),) LESS scores of every pool row (module docstring): ``epochs`` lr-weighted checkpoints,
    exact cosine (``proj_dim=None``) or count-sketch features of ``proj_dim`` dims (8,192 = the official size).
    ``store``: finished checkpoints' cosines are read from and written to it (resumable scoring)."""
    t0 = time.perf_counter()
    key = {"warmup_frac": warmup_frac, "epochs": epochs, "lr": lr, "batch_size": batch_size, "lora_r": lora_r,
           "lora_alpha": lora_alpha, "proj_dim": proj_dim, "seed": seed, "pool": _data_hash(pool_rows),
           "target": _data_hash(target_rows)}
    done = None if store is None else store.finished(key, epochs)
    if done is not None:
        return sum(lr_c * cos for lr_c, cos in done).float()
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
    if store is not None:
        store.warmup_seconds = time.perf_counter() - t0

    scores = torch.zeros(len(pool_rows), dtype=torch.float64)
    for c, ck in enumerate(checkpoints):
        fingerprint = float(sum(w.double().square().sum() for w in ck["weights"]))
        cos = None if store is None else store.load(c, key, fingerprint)
        if cos is None:
            t1 = time.perf_counter()
            with torch.no_grad():
                for p, w in zip(params, ck["weights"], strict=True):
                    p.copy_(w)
            cos = checkpoint_cosines(model, cap, params, ck["m"], ck["v"], pool_rows, target_rows, pad, sketch,
                                     score_batch)
            if store is not None:
                store.save(c, key, fingerprint, ck["lr"], cos, time.perf_counter() - t1)
        scores += ck["lr"] * cos
    return scores.float()


def less_select(scores: torch.Tensor, select_frac: float) -> list[int]:
    k = max(1, int(round(select_frac * scores.numel())))
    return torch.topk(scores, k).indices.tolist()
