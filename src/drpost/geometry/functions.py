"""The capture's autograd functions: how a captured layer's forward runs and what its backward records.

``_LinearFn`` / ``_Conv1DFn`` / ``_EmbeddingFn``: the layer's output, in the autocast dtype when autocast is on (as
``F.linear`` would compute it there), written into a fresh tensor; the backward hands ``(x, dy)`` to the handler's
``record`` and returns the input gradient only, never the weight's. ``_Intercept``: the torch-function mode that runs
a layer subclass's own forward and reroutes only the calls on its weight (used by ``handlers.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from drpost.geometry.factors import narrow


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


# --------------------------------------------------------------------------- custom autograd functions
def _gemm_out(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """x @ w (+ bias) for x (..., d_in), w (d_in, d_out), written into a fresh tensor that is no view: models may
    modify a layer's output in place, which autograd forbids on a view made inside a custom function. A narrow
    output (a LoRA A matrix's rank columns) is computed transposed and copied into place (``factors.narrow``)."""
    y = x.new_empty(*x.shape[:-1], w.shape[1])  # (..., d_out)
    x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, w.shape[1])  # (N, d_in), (N, d_out)
    if narrow(*y2.shape):
        yt = torch.mm(w.t(), x2.t()) if bias is None else torch.addmm(bias[:, None], w.t(), x2.t())  # (d_out, N)
        y2.copy_(yt.t())
    elif bias is None:
        torch.mm(x2, w, out=y2)
    else:
        torch.addmm(bias, x2, w, out=y2)
    return y


def _input_grad(dy: Tensor, w: Tensor, shape: torch.Size) -> Tensor:
    """dy @ w for dy (..., d_out), w (d_out, d_in), as a tensor of the input's ``shape``; a narrow result (the
    input gradient of a LoRA B matrix) is computed transposed (``factors.narrow``)."""
    if narrow(math.prod(dy.shape[:-1]), w.shape[1]):
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, d_out)
        return (w.t() @ dy2.t()).t().contiguous().view(shape)  # (d_in, N) -> (N, d_in)
    return (dy @ w).view(shape)


class _LinearFn(torch.autograd.Function):
    """y = x W^T + b; backward records (x, dy) and returns dx only."""

    @staticmethod
    def forward(ctx, x, weight, bias, handler):
        cdt = _autocast_dtype(x)
        if cdt is not None:  # what autocast does to F.linear: every operand in the autocast dtype
            x, weight = x.to(cdt), weight.to(cdt)
            bias = bias.to(cdt) if bias is not None else None
        ctx.save_for_backward(x, weight)
        ctx.handler = handler
        with torch.autocast(x.device.type, enabled=False):
            return _gemm_out(x, weight.t(), bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.to(x.dtype)
        ctx.handler.record(x, dy)
        dx = _input_grad(dy, weight, x.shape) if ctx.needs_input_grad[0] else None
        return dx, None, None, None


class _Conv1DFn(torch.autograd.Function):
    """y = x W + b with W (d_in, d_out) (Hugging Face Conv1D); backward records (x, dy), returns dx only."""

    @staticmethod
    def forward(ctx, x, weight, bias, handler):
        cdt = _autocast_dtype(x)
        if cdt is not None:
            x, weight = x.to(cdt), weight.to(cdt)
            bias = bias.to(cdt) if bias is not None else None
        ctx.save_for_backward(x, weight)
        ctx.handler = handler
        with torch.autocast(x.device.type, enabled=False):
            return _gemm_out(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.to(x.dtype)
        ctx.handler.record(x, dy)
        dx = _input_grad(dy, weight.t(), x.shape) if ctx.needs_input_grad[0] else None
        return dx, None, None, None


class _EmbeddingFn(torch.autograd.Function):
    """y = W[ids]; backward records (ids, dy); ids get no gradient and neither does W (autocast leaves lookups)."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, handler):
        ctx.save_for_backward(ids)
        ctx.handler = handler
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, dy):
        (ids,) = ctx.saved_tensors
        ctx.handler.record(ids, dy)
        return None, None, None, None


_TRANSPOSES = (Tensor.T.__get__, Tensor.mT.__get__, Tensor.t, torch.t)
_MATMULS = (Tensor.__matmul__, Tensor.matmul, torch.matmul)


class _Intercept(TorchFunctionMode):
    """Inside a module's own forward: reroute ``F.linear`` / ``F.embedding`` on that module's weight, and
    ``x @ weight.T`` (Falcon's Linear), to the capture functions; pass every other call through unchanged. A bias is
    added outside the capture function here (its gradient is then checked against autograd's, see capture.py)."""

    def __init__(self, handler):
        super().__init__()
        self.handler = handler
        self.transposed: list[Tensor] = []  # views weight.T made in this forward

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        h = self.handler
        w = h.module.weight
        if func is F.linear and _arg(args, kwargs, 1, "weight") is w:
            return _plus(h.apply(_arg(args, kwargs, 0, "input"), None), _arg(args, kwargs, 2, "bias"))
        if func is F.embedding and _arg(args, kwargs, 1, "weight") is w and _plain_embedding(args, kwargs):
            return h.apply(_arg(args, kwargs, 0, "input"), _arg(args, kwargs, 2, "padding_idx"))
        if getattr(h, "reroutes_matmul", False) and func in _MATMULS and len(args) == 2 and w.dim() == 2 and \
                any(args[1] is t for t in self.transposed):
            return h.apply(args[0], None)
        out = func(*args, **kwargs)
        if func in _TRANSPOSES and args and args[0] is w and w.dim() == 2:
            self.transposed.append(out)
        return out


def _plus(y: Tensor, bias: Tensor | None) -> Tensor:
    return y if bias is None else y + bias.to(y.dtype)


def _arg(args, kwargs, i: int, name: str):
    return args[i] if len(args) > i else kwargs.get(name)


def _plain_embedding(args, kwargs) -> bool:
    """No max_norm, gradient scaling by frequency or sparse gradients (those change the gradient)."""
    max_norm = _arg(args, kwargs, 3, "max_norm")
    by_freq, sparse = _arg(args, kwargs, 5, "scale_grad_by_freq"), _arg(args, kwargs, 6, "sparse")
    return max_norm is None and not by_freq and not sparse
