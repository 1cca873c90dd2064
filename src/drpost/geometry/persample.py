"""Fast exact per-sample gradients (materialized) from one captured backward: for offline feature methods (LESS).

    U = per_sample_gradients(model, batch, loss_fn)   # (n, P): grads of each sample's summed loss, P = trainable

Uses the same capture as the regularizer (one forward/backward, no weight-gradient GEMM), then materializes each
block's per-row gradients (``kernels.direct_rows`` + the small parameters). Parameter order: ``Capture.blocks``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from drpost.geometry.capture import Capture
from drpost.geometry.kernels import direct_rows


def per_sample_gradients(model: nn.Module, batch: dict, loss_fn, capture: Capture | None = None) -> Tensor:
    """(n, P) per-sample gradients (rows grouped by ``batch['sample_index']`` if present)."""
    cap = capture or Capture(model)
    R = batch["input_ids"].shape[0]
    with cap:
        cap.start(R, batch["input_ids"].shape[1])
        loss, _ = loss_fn(model, batch)
    cap.backward(loss.sum())
    parts = []
    for b in cap.collect():
        ref = next(iter(b.small.values()), None)
        dtype = torch.float32 if ref is None or ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        d = direct_rows(b, dtype)
        if d is not None:
            parts.append(d)
        parts += [g.to(dtype) for g in b.small.values()]
    cap.reset()
    rows = torch.cat([p.to(parts[0].dtype) for p in parts], 1)
    si = batch.get("sample_index")
    if si is None:
        return rows
    ids = torch.unique(torch.as_tensor(si), sorted=True, return_inverse=True)[1].to(rows.device)
    return torch.zeros(int(ids.max()) + 1, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(0, ids, rows)
