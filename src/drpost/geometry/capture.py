"""Capture, in one forward/backward, everything needed for per-row gradients of every trainable parameter.

``Capture(model)`` finds each module that owns trainable parameters and installs a handler, chosen by module type
through ``HANDLERS`` (first match wins):

* ``nn.Linear``, Hugging Face ``Conv1D``, ``nn.Embedding``: the forward runs through a custom autograd function
  whose backward records ``(A, B)`` (input activations, output gradients) and returns the input gradient only,
  so autograd's own weight gradient is never computed (it would be thrown away). Biases become small per-row
  vectors ``sum_t b_rt``.
* ``LayerNorm`` / ``*RMSNorm``: hooks record input and output gradient; per-row weight gradients are
  ``sum_t xhat_rt * b_rt`` (tiny, materialized).
* anything else with trainable parameters: exact per-row gradients by ``torch.func`` vector-Jacobian products on
  the recorded inputs (one warning per module type); never silently dropped.

Gradients autograd still writes for hook-captured parameters are discarded: ``.grad`` is restored to what it was
before the backward, so the regularizer alone decides what lands there.

Parameters are grouped into *blocks* (a module's weight and bias; modules sharing a tied weight merge into one
block). Layer scope = one selection per block.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drpost.geometry.factors import Act, OneHot

try:  # Hugging Face GPT-2 style Conv1D: y = x @ W + b, W (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a dependency
    Conv1D = ()


@dataclass
class Use:
    """One call of a weight: per-row gradient G_r = B_r^T A_r (canonical), parameter layout G or G^T."""

    a: Act  # (R, T, d_in) dense or one-hot ids
    b: Tensor  # (R, T, d_out)
    transposed: bool  # parameter stores G^T (Conv1D, Embedding)


@dataclass
class Block:
    """A unit of layer scope: its factored weights (with their uses) and its small materialized parameters."""

    name: str
    factored: dict[nn.Parameter, list[Use]] = field(default_factory=dict)
    # small parameters: per-row gradients (R, numel) filled after the backward
    small: dict[nn.Parameter, Tensor] = field(default_factory=dict)
    params: list[nn.Parameter] = field(default_factory=list)

    def clear(self) -> None:
        self.factored = {p: [] for p in self.factored}
        self.small = {}


def _rows3(x: Tensor, rows: int) -> Tensor:
    """View (R, ..., d) as (R, T, d) with T = product of the middle dims."""
    if x.shape[0] != rows:
        raise RuntimeError(
            f"drpost capture expected a leading batch dimension of {rows} rows, got shape {tuple(x.shape)}; "
            "layers that mix or reorder rows (e.g. token-routed experts) are not supported by the factored kernels"
        )
    return x.reshape(rows, -1, x.shape[-1])


# --------------------------------------------------------------------------- custom autograd functions
class _LinearFn(torch.autograd.Function):
    """y = x W^T + b; backward records (x, dy) and returns dx only."""

    @staticmethod
    def forward(ctx, x, weight, bias, handler):
        ctx.save_for_backward(x, weight)
        ctx.handler = handler
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        ctx.handler.record(x, dy)
        dx = dy @ weight if ctx.needs_input_grad[0] else None
        return dx, None, None, None


class _Conv1DFn(torch.autograd.Function):
    """y = x W + b with W (d_in, d_out) (Hugging Face Conv1D); backward records (x, dy), returns dx only."""

    @staticmethod
    def forward(ctx, x, weight, bias, handler):
        ctx.save_for_backward(x, weight)
        ctx.handler = handler
        y = x @ weight
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        ctx.handler.record(x, dy)
        dx = dy @ weight.t() if ctx.needs_input_grad[0] else None
        return dx, None, None, None


class _EmbeddingFn(torch.autograd.Function):
    """y = W[ids]; backward records (ids, dy); ids get no gradient and neither does W."""

    @staticmethod
    def forward(ctx, ids, weight, handler):
        ctx.save_for_backward(ids)
        ctx.handler = handler
        return F.embedding(ids, weight, handler.module.padding_idx)

    @staticmethod
    def backward(ctx, dy):
        (ids,) = ctx.saved_tensors
        ctx.handler.record(ids, dy)
        return None, None, None


# --------------------------------------------------------------------------- handlers
class Handler:
    """Installs capture on one module; ``finish()`` turns what was recorded into the block's per-row data."""

    patches_forward = True

    def __init__(self, module: nn.Module, name: str, capture: Capture):
        self.module = module
        self.name = name
        self.capture = capture
        self.trainable = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}

    # weights handled by factored uses; everything else is "small"
    def factored_params(self) -> list[nn.Parameter]:
        return []

    def install(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        if "forward" in self.module.__dict__:
            del self.module.forward

    def finish(self, block: Block) -> None:
        raise NotImplementedError


class _FactoredHandler(Handler):
    transposed = False

    def __init__(self, module, name, capture):
        super().__init__(module, name, capture)
        self.records: list[tuple[Tensor, Tensor]] = []

    def factored_params(self):
        return [self.trainable["weight"]] if "weight" in self.trainable else []

    def record(self, x: Tensor, dy: Tensor) -> None:
        self.records.append((x.detach(), dy.detach()))

    def _act(self, x: Tensor) -> Act:
        return _rows3(x, self.capture.rows)

    def finish(self, block: Block) -> None:
        R = self.capture.rows
        w = self.trainable.get("weight")
        bias = self.trainable.get("bias")
        bias_rows = None
        for x, dy in self.records:
            b = _rows3(dy, R)
            if w is not None:
                block.factored[w].append(Use(self._act(x), b, self.transposed))
            if bias is not None:
                br = b.sum(1)  # (R, d_out)
                bias_rows = br if bias_rows is None else bias_rows + br
        if bias is not None and bias_rows is not None:
            block.small[bias] = bias_rows
        self.records = []


class LinearHandler(_FactoredHandler):
    fn = _LinearFn

    def install(self):
        m, h, fn = self.module, self, self.fn

        def forward(self_, x):
            return fn.apply(x, m.weight, m.bias, h)

        m.forward = types.MethodType(forward, m)


class Conv1DHandler(LinearHandler):
    fn = _Conv1DFn
    transposed = True


class EmbeddingHandler(_FactoredHandler):
    transposed = True

    def install(self):
        m, h = self.module, self

        def forward(self_, ids):
            R = h.capture.rows
            if ids.shape[0] == 1 and R > 1:  # GPT-2's position embedding is called with a batch of one
                ids = ids.expand(R, *ids.shape[1:])
            return _EmbeddingFn.apply(ids, m.weight, h)

        m.forward = types.MethodType(forward, m)

    def record(self, ids, dy):
        if self.module.padding_idx is not None:  # the padding row never receives gradient
            dy = dy * (ids != self.module.padding_idx).unsqueeze(-1).to(dy.dtype)
        super().record(ids, dy)

    def _act(self, ids):
        return OneHot(ids.reshape(self.capture.rows, -1), self.module.num_embeddings)


class _HookHandler(Handler):
    """Records inputs in a forward hook and output gradients with a tensor hook; autograd grads are discarded."""

    patches_forward = False

    def __init__(self, module, name, capture):
        super().__init__(module, name, capture)
        self.calls: list[dict] = []
        self._hook = None

    def install(self):
        def hook(mod, args, kwargs, out):
            det = lambda v: v.detach() if isinstance(v, Tensor) else v  # noqa: E731
            call = {"args": tuple(det(a) for a in args), "kwargs": {k: det(v) for k, v in kwargs.items()},
                    "grads": {}}
            outs = out if isinstance(out, tuple) else (out,)
            for k, o in enumerate(outs):
                if isinstance(o, Tensor) and o.requires_grad:
                    o.register_hook(lambda g, k=k, call=call: call["grads"].__setitem__(k, g.detach()))
            call["n_out"] = len(outs)
            call["tuple"] = isinstance(out, tuple)
            self.calls.append(call)

        self._hook = self.module.register_forward_hook(hook, with_kwargs=True)

    def remove(self):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def finish(self, block: Block) -> None:
        acc: dict[nn.Parameter, Tensor] = {}
        for call in self.calls:
            if not call["grads"]:
                continue
            for p, g in self.per_row(call).items():
                acc[p] = g if p not in acc else acc[p] + g
        for p, g in acc.items():
            block.small[p] = g.reshape(g.shape[0], -1)
        self.calls = []

    def per_row(self, call: dict) -> dict[nn.Parameter, Tensor]:
        raise NotImplementedError


class NormHandler(_HookHandler):
    """LayerNorm and RMSNorm: d out / d weight = xhat (elementwise), d out / d bias = 1."""

    def xhat(self, x: Tensor) -> Tensor:
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        eps = getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6))
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def per_row(self, call):
        R = self.capture.rows
        x = _rows3(call["args"][0], R)
        b = _rows3(call["grads"][0], R)
        out = {}
        if "weight" in self.trainable:
            out[self.trainable["weight"]] = (self.xhat(x).to(b.dtype) * b).sum(1)
        if "bias" in self.trainable:
            out[self.trainable["bias"]] = b.sum(1)
        return out


class FallbackHandler(_HookHandler):
    """Exact per-row gradients of any row-separable module by a vector-Jacobian product per row."""

    _warned: set[str] = set()

    def __init__(self, module, name, capture):
        super().__init__(module, name, capture)
        kind = type(module).__name__
        if kind not in FallbackHandler._warned:
            FallbackHandler._warned.add(kind)
            warnings.warn(
                f"drpost: no kernel for {kind} (e.g. {name!r}); using exact per-sample gradients via torch.func "
                "(slower; materializes per-row gradients of its parameters)",
                stacklevel=3,
            )

    def per_row(self, call):
        R = self.capture.rows
        names = list(self.trainable)
        params = {n: p.detach() for n, p in self.trainable.items()}

        def slice_row(v, r):
            return v[r : r + 1] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == R else v

        grads_out = []
        for r in range(R):
            args = tuple(slice_row(a, r) for a in call["args"])
            kwargs = {k: slice_row(v, r) for k, v in call["kwargs"].items()}

            def f(*ps, args=args, kwargs=kwargs):
                out = torch.func.functional_call(self.module, dict(zip(names, ps, strict=True)), args, kwargs)
                outs = out if isinstance(out, tuple) else (out,)
                return tuple(outs[k] for k in sorted(call["grads"]))

            with _suspended(self):
                _, vjp = torch.func.vjp(f, *[params[n] for n in names])
                cot = tuple(call["grads"][k][r : r + 1] for k in sorted(call["grads"]))
                grads_out.append(vjp(cot))
        return {self.trainable[n]: torch.stack([g[i] for g in grads_out]) for i, n in enumerate(names)}


class _suspended:
    """Temporarily remove a handler's hook (so re-running the module inside the vjp records nothing)."""

    def __init__(self, handler: _HookHandler):
        self.h = handler

    def __enter__(self):
        self.hook = self.h._hook
        if self.hook is not None:
            self.hook.remove()

    def __exit__(self, *exc):
        if self.hook is not None:
            self.h.install()


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")


# Explicit table: (predicate, handler). First match wins; the fallback covers everything else.
HANDLERS: list[tuple[Callable[[nn.Module], bool], type[Handler]]] = [
    (lambda m: isinstance(m, nn.Linear), LinearHandler),
    (lambda m: bool(Conv1D) and isinstance(m, Conv1D), Conv1DHandler),
    (lambda m: isinstance(m, nn.Embedding) and m.max_norm is None and not m.sparse, EmbeddingHandler),
    (_is_norm, NormHandler),
]


def handler_for(module: nn.Module) -> type[Handler]:
    for pred, cls in HANDLERS:
        if pred(module):
            return cls
    return FallbackHandler


class Capture:
    """Context manager: installs handlers on every module owning trainable parameters.

    ``linear_only=True`` captures only Linear/Conv1D (and PEFT LoRA's inner Linear) layers; other trainable
    parameters are frozen for the duration of the step (the user asked for "linear layers only").
    """

    def __init__(self, model: nn.Module, linear_only: bool = False):
        self.model = model
        self.rows = 0
        self.handlers: list[Handler] = []
        self.frozen: list[nn.Parameter] = []
        for name, mod in model.named_modules():
            if not any(p.requires_grad for p in mod.parameters(recurse=False)):
                continue
            cls = handler_for(mod)
            if linear_only and cls not in (LinearHandler, Conv1DHandler):
                self.frozen += [p for p in mod.parameters(recurse=False) if p.requires_grad]
                continue
            self.handlers.append(cls(mod, name, self))
        if not self.handlers:
            raise ValueError("the model has no trainable parameters (every requires_grad is False)")
        self.blocks = self._make_blocks()
        self._stash: dict[nn.Parameter, Tensor | None] = {}

    def _make_blocks(self) -> list[Block]:
        # union modules that share a parameter (tied embeddings) into one block
        owner: dict[int, int] = {}
        parent = list(range(len(self.handlers)))

        def find(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i, h in enumerate(self.handlers):
            for p in h.trainable.values():
                j = owner.setdefault(id(p), i)
                parent[find(i)] = find(j)
        groups: dict[int, list[int]] = {}
        for i in range(len(self.handlers)):
            groups.setdefault(find(i), []).append(i)
        blocks = []
        self.block_of: list[int] = [0] * len(self.handlers)
        for members in groups.values():
            hs = [self.handlers[i] for i in members]
            block = Block(name="+".join(h.name or "<root>" for h in hs))
            seen = set()
            for i, h in zip(members, hs, strict=True):
                self.block_of[i] = len(blocks)
                for p in h.factored_params():
                    block.factored.setdefault(p, [])
                for p in h.trainable.values():
                    if id(p) not in seen:
                        seen.add(id(p))
                        block.params.append(p)
            blocks.append(block)
        return blocks

    @property
    def hook_params(self) -> list[nn.Parameter]:
        """Parameters whose gradient autograd still computes (and we discard)."""
        return [p for h in self.handlers if not h.patches_forward for p in h.trainable.values()]

    def __enter__(self) -> Capture:
        for h in self.handlers:
            h.install()
        for p in self.frozen:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handlers:
            h.remove()
        for p in self.frozen:
            p.requires_grad_(True)

    def backward(self, loss: Tensor) -> None:
        """Back-propagate ``loss`` with the handlers installed, discarding autograd's grads of hook-captured params.

        The handlers stay installed during the backward because activation checkpointing re-runs forwards there:
        the recomputation must go through the same capture functions as the original forward."""
        with self:
            self.stash_grads()
            try:
                loss.backward()
            finally:
                self.restore_grads()

    def stash_grads(self) -> None:
        self._stash = {p: p.grad for p in self.hook_params}
        for p in self._stash:
            p.grad = None

    def restore_grads(self) -> None:
        for p, g in self._stash.items():
            p.grad = g
        self._stash = {}

    def collect(self) -> list[Block]:
        """After the backward: fill every block with its uses and small per-row gradients."""
        for b in self.blocks:
            b.clear()
        for i, h in enumerate(self.handlers):
            h.finish(self.blocks[self.block_of[i]])
        return self.blocks

    def reset(self) -> None:
        for h in self.handlers:
            if isinstance(h, _FactoredHandler):
                h.records = []
            elif isinstance(h, _HookHandler):
                h.calls = []
        for b in self.blocks:
            b.clear()
