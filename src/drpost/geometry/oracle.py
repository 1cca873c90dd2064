"""The reference oracle: exact per-sample gradients by ``torch.func``, independent of the capture machinery.

Each sample (its rows, as a batch of its own) is run through ``torch.func.grad`` of its summed loss with
``functional_call``; nothing here touches hooks or kernels. Used by the tests and available for debugging:

    u = per_sample_grads(model, batch, drpost.objectives.causal_lm_loss)   # {name: (n, *shape)}

Run models in float64 with eager attention for 1e-10-level agreement.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _Bound:
    """Calls ``model`` with a given parameter dict (what ``loss_fn(model, batch)`` sees)."""

    def __init__(self, model: nn.Module, params: dict[str, Tensor]):
        self._model, self._params = model, params

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self._model, self._params, args, kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _sample_rows(batch: dict) -> tuple[Tensor, int]:
    R = batch["input_ids"].shape[0]
    si = batch.get("sample_index")
    if si is None:
        return torch.arange(R), R
    ids = torch.unique(torch.as_tensor(si), sorted=True, return_inverse=True)[1]
    return ids, int(ids.max()) + 1


def _sub(batch: dict, idx: Tensor) -> dict:
    R = batch["input_ids"].shape[0]
    return {k: (v[idx] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == R else v)
            for k, v in batch.items() if k != "sample_index"}


def per_sample_grads(model: nn.Module, batch: dict, loss_fn) -> tuple[dict[str, Tensor], Tensor]:
    """({name: (n, *shape)} gradients of each sample's summed loss, counts (n,) loss tokens per sample)."""
    params = {n: p.detach() for n, p in trainable(model).items()}
    ids, n = _sample_rows(batch)

    def f(ps, sub):
        loss_sums, counts = loss_fn(_Bound(model, ps), sub)
        return loss_sums.sum(), counts.sum()

    grad_f = torch.func.grad(f, has_aux=True)
    out = {k: [] for k in params}
    counts = []
    for i in range(n):
        g, c = grad_f(params, _sub(batch, torch.nonzero(ids == i).flatten()))
        for k in params:
            out[k].append(g[k])
        counts.append(c)
    return {k: torch.stack(v) for k, v in out.items()}, torch.stack(counts)


def flat(grads: dict[str, Tensor], names: list[str] | None = None) -> Tensor:
    """Concatenate per-sample gradients into (n, P)."""
    names = list(grads) if names is None else names
    return torch.cat([grads[k].reshape(grads[k].shape[0], -1) for k in names], 1)


def reference_geometry(model: nn.Module, general: dict, target: dict, loss_fn) -> dict:
    """Oracle quantities of one step: u (n, P) general summed-loss grads, counts (n,), g_T (P,), names."""
    u, counts = per_sample_grads(model, general, loss_fn)
    ut, tcounts = per_sample_grads(model, target, loss_fn)
    names = list(u)
    U, UT = flat(u, names), flat(ut, names)
    return {"u": U, "counts": counts, "g_T": UT.sum(0) / tcounts.sum(), "u_target": UT,
            "target_counts": tcounts, "names": names, "per_param": u, "per_param_target": ut}
