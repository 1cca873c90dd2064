"""Fast exact per-sample gradients (materialized) from one captured backward: for offline feature methods (LESS).

    U = per_sample_gradients(model, batch, loss_fn)   # (n, P): grads of each sample's summed loss, P = trainable
    for U_b in per_sample_gradient_blocks(model, batch, loss_fn):   # the same columns, (n, P_b) part by part

Uses the same capture as the regularizer (one forward/backward, no weight-gradient GEMM), then materializes each
block's per-row gradients (``kernels.direct_rows`` + the small parameters). Parameter order: ``Capture.blocks``.
The block-by-block form lets a caller reduce each part as it comes (LESS: dot products and norms) and never hold the
(n, P) matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from drpost.geometry.capture import Capture
from drpost.geometry.kernels import direct_rows


def per_sample_gradient_blocks(model: nn.Module, batch: dict, loss_fn, capture: Capture | None = None):
    """Yields (n, P_b) per-sample gradients part by part (a block's weight, then its small parameters), in the
    column order of ``per_sample_gradients``; rows grouped by ``batch['sample_index']`` if present."""
    cap = capture or Capture(model)
    R = batch["input_ids"].shape[0]
    with cap:
        cap.start(R, batch["input_ids"].shape[1])
        loss, _ = loss_fn(model, batch)
    cap.backward(loss.sum())
    si = batch.get("sample_index")
    ids = None if si is None else torch.unique(torch.as_tensor(si), sorted=True, return_inverse=True)[1]
    try:
        out_dtype = None
        for b in cap.collect():
            ref = next(iter(b.small.values()), None)
            dtype = torch.float32 if ref is None or ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
            d = direct_rows(b, dtype)
            for part in ([d] if d is not None else []) + [g.to(dtype) for g in b.small.values()]:
                out_dtype = out_dtype or part.dtype  # every part in the first part's dtype
                part = part.to(out_dtype)
                if ids is not None:
                    ids = ids.to(part.device)
                    part = torch.zeros(int(ids.max()) + 1, part.shape[1], dtype=part.dtype,
                                       device=part.device).index_add_(0, ids, part)
                yield part
    finally:
        cap.reset()


def per_sample_gradients(model: nn.Module, batch: dict, loss_fn, capture: Capture | None = None) -> Tensor:
    """(n, P) per-sample gradients (rows grouped by ``batch['sample_index']`` if present)."""
    return torch.cat(list(per_sample_gradient_blocks(model, batch, loss_fn, capture)), 1)
