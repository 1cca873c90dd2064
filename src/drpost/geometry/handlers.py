"""Per-module capture handlers: how each kind of module yields per-row gradients of its own parameters.

Owned here (``geometry/capture.py`` picks a handler per module through ``HANDLERS`` and checks the result):

* ``LinearHandler`` / ``Conv1DHandler`` / ``EmbeddingHandler`` (*factored*): the weight's uses run through custom
  autograd functions whose backward records ``(A, B)`` (input activations, output gradients) and returns the input
  gradient only, so autograd's own weight gradient is never computed. A module whose class keeps the base forward
  (``type(m).forward is nn.Linear.forward``) gets that forward replaced by an equivalent one; a subclass that
  overrides ``forward`` (Gemma's scaled embeddings, OPT's positional embeddings, ...) keeps its own forward, run
  under ``_Intercept`` (``geometry/functions.py``, with the autograd functions), a torch-function mode that reroutes
  only the calls on the module's own weight. Either way the model computes exactly what it computed before.
  A weight alone in its block whose per-row gradients ``G_r = B_r^T A_r`` take no more memory than its factors (a
  LoRA matrix: ``p q <= T (p + q)``) gets them computed right in the backward (``materialize``, set by the capture):
  the factors are then freed as a plain backward frees them, the step's memory stays near a plain step's, and every
  exact scoring method reads these rows (``Block.rows``).
* ``NormHandler``: LayerNorm / RMSNorm weights and biases, ``sum_t xhat_rt * b_rt`` per row (tiny, materialized).
* ``FallbackHandler``: any other module with trainable parameters; exact per-row gradients by vector-Jacobian
  products (a replay of the module's forward on one row's recorded inputs, then ``torch.autograd.grad``). It owns
  its whole subtree: the parameters of every descendant module are covered by the same replays (a state-space mixer
  that uses its ``conv1d`` or ``dt_proj`` weight functionally is exact this way).

Rows: the capture knows the merged batch's rows R and sequence length T. A module input is split into rows when its
leading dimension is R (``(R, ..., d)``) or R*T (token-flattened ``(R*T, d)``, the layout ``x.view(-1, d)`` of an
``(R, T, d)`` tensor gives, as mixture-of-experts blocks use); anything else raises ``UnsupportedModelError``.

Mixed precision: a forward under ``torch.autocast`` computes in the autocast dtype exactly as ``F.linear`` would
there, and the backward works inside or outside the autocast region (factors are recorded in the compute dtype;
kernels accumulate in float32).
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drpost.geometry.factors import Act, Block, OneHot, RowGrads, Use, per_row, work_dtype
from drpost.geometry.functions import _Conv1DFn, _EmbeddingFn, _Intercept, _LinearFn

if TYPE_CHECKING:
    from drpost.geometry.capture import Capture

try:  # Hugging Face GPT-2 style Conv1D: y = x @ W + b, W (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a dependency
    Conv1D = ()


class UnsupportedModelError(ValueError):
    """A model (or one of its parameters) that drpost cannot give exact per-sample gradients for; says what to do."""


def rows_view(x: Tensor, capture: Capture, what: str) -> Tensor:
    """View a module tensor as (R, T', d): leading R rows, or R*T token-flattened rows (row-major)."""
    R, T = capture.rows, capture.tokens
    if x.shape[0] == R:
        return x.reshape(R, -1, x.shape[-1])
    if x.dim() == 2 and T > 0 and x.shape[0] == R * T:
        return x.reshape(R, T, x.shape[-1])
    raise UnsupportedModelError(
        f"drpost: {what} receives a tensor of shape {tuple(x.shape)} whose leading dimension is neither the "
        f"{R} rows nor the {R * T} tokens of the batch (R={R}, T={T}): it mixes or reorders rows (e.g. token-routed "
        "experts called on a subset of tokens), so its per-sample gradients cannot be recovered. Freeze its "
        "parameters, leave it out of LoRA's target_modules, or use linear_only=True."
    )


def _check_leaf(weight: Tensor, handler: Handler) -> None:
    if weight.requires_grad and weight.grad_fn is not None:
        raise UnsupportedModelError(
            f"drpost: the weight of {handler.name!r} is computed from other parameters (a parametrization or an "
            "adapter that rewrites the weight), so per-sample gradients of those parameters cannot be captured. "
            "Use adapters that are separate modules (PEFT LoRA on Linear layers) or freeze them."
        )


class _Rows(NamedTuple):
    """One call's per-row gradients of a factored weight (parameter layout), and of its bias."""

    g: Tensor  # (R, *weight), maybe a transposed view
    bias_rows: Tensor | None  # (R, d_out)


# --------------------------------------------------------------------------- handlers
class Handler:
    """Installs capture on one module; ``finish()`` turns what was recorded into the block's per-row data."""

    patches_forward = True

    def __init__(self, module: nn.Module, name: str, capture: Capture):
        self.module = module
        self.name = name
        self.capture = capture
        self.trainable = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}

    def factored_params(self) -> list[nn.Parameter]:
        """Weights handled by factored uses (autograd never computes their gradient); the rest are "small"."""
        return []

    def checked_params(self) -> list[nn.Parameter]:
        """Parameters autograd still computes a gradient for, to check the per-row gradients against."""
        return [] if self.patches_forward else list(self.trainable.values())

    def install(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        if "forward" in self.module.__dict__:
            del self.module.forward

    def finish(self, block: Block) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


class _FactoredHandler(Handler):
    transposed = False
    base: type[nn.Module] = nn.Module

    def __init__(self, module, name, capture):
        super().__init__(module, name, capture)
        self.records: list[tuple[Tensor, Tensor] | _Rows] = []  # per call: (x, dy), or its per-row gradients
        self.materialize = False  # set by the capture: this weight is its block's only factored use (module docstring)

    def factored_params(self):
        return [self.trainable["weight"]] if "weight" in self.trainable else []

    @property
    def intercepts(self) -> bool:
        """The module keeps its own forward (a subclass's, or an instance-level one) run under ``_Intercept``."""
        m = self.module
        return "forward" in m.__dict__ or type(m).forward is not self.base.forward

    def checked_params(self) -> list[nn.Parameter]:
        """Under ``_Intercept`` a bias is added by plain autograd: checked, not owned."""
        b = self.trainable.get("bias")
        return [b] if b is not None and self.intercepts else []

    def apply(self, x: Tensor, extra) -> Tensor:
        raise NotImplementedError

    def install(self):
        m, h = self.module, self
        self._prev = m.__dict__.get("forward")  # an instance-level forward (e.g. accelerate's hooks) is kept
        if self._prev is None and type(m).forward is self.base.forward:  # the base forward: replace it

            def forward(self_, x):
                return h.apply(x, m.bias)

        else:  # a subclass with its own forward: run it, rerouting the calls on this weight
            original = m.forward

            def forward(self_, *args, **kwargs):
                with _Intercept(h):
                    return original(*args, **kwargs)

        m.forward = types.MethodType(forward, m)

    def remove(self):
        super().remove()
        if getattr(self, "_prev", None) is not None:
            self.module.forward = self._prev
        self._prev = None

    def record(self, x: Tensor, dy: Tensor) -> None:
        x, dy = x.detach(), dy.detach()
        rows = self._materialized(x, dy) if self.materialize else None
        self.records.append(rows if rows is not None else (x, dy))

    def _materialized(self, x: Tensor, dy: Tensor) -> _Rows | None:
        """This call's per-row gradients, when they take no more memory than its factors (p q <= T (p + q) per row,
        in bytes); None to keep the factors (or when the shapes are not per row: ``finish`` then says why)."""
        w = self.trainable.get("weight")
        if w is None:
            return None
        try:
            a, b = self._act(x), rows_view(dy, self.capture, f"module {self.name!r}")  # (R, T, q), (R, T, p)
        except UnsupportedModelError:
            return None
        dt = work_dtype(b.dtype)
        p, q, T = b.shape[-1], a.shape[-1], a.shape[1]
        if p * q * dt.itemsize > T * (p * b.element_size() + q * a.element_size()):
            return None
        g = per_row(b.to(dt), a.to(dt))  # (R, d_out, d_in), a transposed view for a narrow layer
        return _Rows(g.transpose(1, 2) if self.transposed else g, b.sum(1) if "bias" in self.trainable else None)

    def reset(self) -> None:
        self.records = []

    def _act(self, x: Tensor) -> Act:
        return rows_view(x, self.capture, f"module {self.name!r}")

    def finish(self, block: Block) -> None:
        w = self.trainable.get("weight")
        bias = self.trainable.get("bias")
        held = any(isinstance(r, _Rows) for r in self.records)  # then every call's per-row gradients are summed
        bias_rows = g_sum = None
        for rec in self.records:
            if isinstance(rec, _Rows):
                g, br = rec
            else:
                x, dy = rec
                b = rows_view(dy, self.capture, f"module {self.name!r}")  # (R, T, d_out)
                br = b.sum(1) if bias is not None else None  # (R, d_out)
                g = None
                if w is not None and held:  # a call the memory rule kept as factors, beside materialized ones
                    dt = work_dtype(b.dtype)
                    g = per_row(b.to(dt), self._act(x).to(dt))
                    g = g.transpose(1, 2) if self.transposed else g
                elif w is not None:
                    block.factored[w].append(Use(self._act(x), b, self.transposed))
            if g is not None:
                g_sum = g if g_sum is None else g_sum + g  # (R, *weight)
            if br is not None:
                bias_rows = br if bias_rows is None else bias_rows + br
        if g_sum is not None:
            block.rows = RowGrads.of([(w, g_sum)])
        if bias is not None and bias_rows is not None:
            block.small[bias] = bias_rows
        self.records = []


class LinearHandler(_FactoredHandler):
    base = nn.Linear
    reroutes_matmul = True  # x @ weight.T in a subclass's forward (Falcon) goes through the capture too

    def apply(self, x, bias):
        _check_leaf(self.module.weight, self)
        return _LinearFn.apply(x, self.module.weight, bias, self)


class Conv1DHandler(_FactoredHandler):
    base = Conv1D if Conv1D else nn.Module
    transposed = True

    def apply(self, x, bias):
        _check_leaf(self.module.weight, self)
        return _Conv1DFn.apply(x, self.module.weight, bias, self)


class EmbeddingHandler(_FactoredHandler):
    base = nn.Embedding
    transposed = True

    def install(self):
        m, h = self.module, self
        if "forward" not in m.__dict__ and type(m).forward is nn.Embedding.forward:
            self._prev = None

            def forward(self_, ids):
                return h.apply(ids, m.padding_idx)

            m.forward = types.MethodType(forward, m)
        else:
            super().install()

    def apply(self, ids, padding_idx):
        _check_leaf(self.module.weight, self)
        R, T = self.capture.rows, self.capture.tokens
        # positions shared by every row are looked up per row, so each row's gradient stays its own (the output
        # then has the rows' leading dimension, which broadcasting gave it anyway): a batch of one (GPT-2), or a
        # 1-D (T,) tensor (BART-style learned positions; read as positions even when R == T, never as per-row ids)
        if ids.dim() >= 1 and ids.shape[0] == 1 and R > 1:
            ids = ids.expand(R, *ids.shape[1:])
        elif ids.dim() == 1 and T > 0 and ids.shape[0] == T:
            ids = ids.unsqueeze(0).expand(R, T)
        return _EmbeddingFn.apply(ids, self.module.weight, padding_idx, self)

    def record(self, ids, dy):
        if self.module.padding_idx is not None:  # the padding row never receives gradient
            dy = dy * (ids != self.module.padding_idx).unsqueeze(-1).to(dy.dtype)
        super().record(ids, dy)

    def _act(self, ids):
        R = self.capture.rows
        if ids.shape[0] != R:
            rows_view(ids.unsqueeze(-1), self.capture, f"module {self.name!r}")  # raises the clear error
        return OneHot(ids.reshape(R, -1), self.module.num_embeddings)


class _HookHandler(Handler):
    """Records inputs in a forward hook and output gradients with a tensor hook; autograd's own gradient of these
    parameters is computed too, and used only to check the per-row gradients (capture.py)."""

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
            outs = list(out) if isinstance(out, tuple) else [out]
            for k, o in enumerate(outs):
                if isinstance(o, Tensor) and o.requires_grad and o.is_floating_point():
                    # a fresh view per output: its hook sees only the gradient from outside the module (an output
                    # computed from another output, like a router's scores from its logits, is not counted twice)
                    outs[k] = o.view_as(o)
                    outs[k].register_hook(lambda g, k=k, call=call: call["grads"].__setitem__(k, g.detach()))
            self.calls.append(call)
            return tuple(outs) if isinstance(out, tuple) else outs[0]

        self._hook = self.module.register_forward_hook(hook, with_kwargs=True)

    def remove(self):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def reset(self) -> None:
        self.calls = []

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

    def inv_rms(self, xf: Tensor) -> Tensor:
        """RMSNorm's per-token scale ``1 / sqrt(mean(x^2) + eps)`` of ``xf`` (fp32 or wider).  (R, T', d) -> (R, T', 1)"""
        eps = getattr(self.module, "variance_epsilon", getattr(self.module, "eps", 1e-6))
        return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)

    def xhat(self, x: Tensor) -> Tensor:
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return (xf * self.inv_rms(xf)).to(x.dtype)

    def weight_rows(self, x: Tensor, b: Tensor) -> Tensor:
        """Per-row gradient of the weight, ``sum_t xhat_rt * b_rt``.  (R, T', d) x2 -> (R, d)

        RMSNorm in fp32 / fp64 skips forming ``xhat``: ``sum_t s_rt (x_rt * b_rt)`` with the per-token scale ``s``,
        one batched GEMV over a single elementwise product (three passes over the activations instead of six).
        16-bit inputs round ``xhat`` to their dtype first, as the module's own forward does."""
        wide = (torch.float32, torch.float64)
        if isinstance(self.module, nn.LayerNorm) or x.dtype not in wide or b.dtype != x.dtype:
            return (self.xhat(x).to(b.dtype) * b).sum(1)
        return torch.bmm(self.inv_rms(x).transpose(1, 2), x * b).squeeze(1)

    def per_row(self, call):
        what = f"module {self.name!r}"
        x = rows_view(call["args"][0], self.capture, what)
        b = rows_view(call["grads"][0], self.capture, what)
        out = {}
        if "weight" in self.trainable:
            out[self.trainable["weight"]] = self.weight_rows(x, b)
        if "bias" in self.trainable:
            out[self.trainable["bias"]] = b.sum(1)
        return out


class FallbackHandler(_HookHandler):
    """Exact per-row gradients of any row-separable module by a vector-Jacobian product per row.

    ``absorbed`` are parameters of descendant modules (themselves without a kernel) covered by this module's vjp."""

    _warned: set[str] = set()

    def __init__(self, module, name, capture, absorbed: dict[str, nn.Parameter] | None = None):
        super().__init__(module, name, capture)
        self.trainable.update(absorbed or {})
        kind = type(module).__name__
        if kind not in FallbackHandler._warned:
            FallbackHandler._warned.add(kind)
            warnings.warn(
                f"drpost: no kernel for {kind} (e.g. {name!r}); using exact per-sample gradients by per-row replays "
                "(slower; materializes per-row gradients of its parameters)",
                stacklevel=4,
            )

    def _slicer(self, r: int) -> Callable:
        R, T = self.capture.rows, self.capture.tokens
        what = f"module {self.name!r}"

        def cut(v):
            if isinstance(v, Tensor) and v.dim() > 0:
                if v.shape[0] == R:
                    return v[r : r + 1]
                if T > 0 and v.shape[0] == R * T:
                    return v[r * T : (r + 1) * T]
                if v.shape[0] == 1 or not v.is_floating_point():
                    return v  # broadcast (e.g. positions of a batch of one) or index tables
                raise UnsupportedModelError(
                    f"drpost: {what} is called with a tensor of shape {tuple(v.shape)} that is neither per row "
                    f"(R={R}) nor per token (R*T={R * T}); its per-sample gradients cannot be computed. Freeze its "
                    "parameters or leave it out of LoRA's target_modules."
                )
            if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device)):
                return v
            if isinstance(v, (tuple, list)):
                return type(v)(cut(e) for e in v)
            return _stateful(v, what)

        return cut

    def per_row(self, call):
        R = self.capture.rows
        params = list({id(p): p for p in self.trainable.values()}.values())  # tied names -> one parameter
        keys = sorted(call["grads"])
        grads_out = []
        # replays run the plain modules (nothing is recorded twice) with ordinary autograd: custom autograd
        # functions inside the module work, and gradients go to these parameters only (autograd.grad, no .grad)
        with self.capture.uninstalled(), torch.enable_grad():
            for r in range(R):
                cut = self._slicer(r)
                try:
                    out = self.module(*(cut(a) for a in call["args"]),
                                      **{k: cut(v) for k, v in call["kwargs"].items()})
                except RuntimeError as e:  # e.g. state kept from the batched forward in the module itself
                    raise UnsupportedModelError(
                        f"drpost: module {self.name!r} cannot be replayed on one row to get its per-sample "
                        f"gradients ({type(e).__name__}: {str(e).splitlines()[0]}); it likely keeps per-batch "
                        "state. Freeze its parameters or leave it out of LoRA's target_modules.") from e
                outs = out if isinstance(out, tuple) else (out,)
                prim = [outs[k] for k in keys]
                cot = [cut(call["grads"][k]).to(o.dtype) for k, o in zip(keys, prim, strict=True)]
                gs = torch.autograd.grad(prim, params, cot, allow_unused=True)
                grads_out.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, gs, strict=True)])
        return {p: torch.stack([g[i] for g in grads_out]) for i, p in enumerate(params)}


def _stateful(v, what: str):
    """Arguments that hold per-batch state (a key/value or SSM cache): replays run without them."""
    kind = type(v).__name__
    if "cache" in kind.lower():
        return None
    raise UnsupportedModelError(
        f"drpost: {what} is called with an argument of type {kind} that cannot be split per row; its per-sample "
        "gradients cannot be computed. Freeze its parameters or leave it out of LoRA's target_modules."
    )


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")


def _is_embedding(m: nn.Module) -> bool:
    return isinstance(m, nn.Embedding) and m.max_norm is None and not m.sparse and not m.scale_grad_by_freq


# Explicit table: (predicate, handler). First match wins; the fallback covers everything else. Norms are checked
# by the capture against autograd's own gradient, so an unusual norm formula is refused, never wrong.
HANDLERS: list[tuple[Callable[[nn.Module], bool], type[Handler]]] = [
    (lambda m: isinstance(m, nn.Linear), LinearHandler),
    (lambda m: bool(Conv1D) and type(m) is Conv1D, Conv1DHandler),
    (_is_embedding, EmbeddingHandler),
    (_is_norm, NormHandler),
]


def handler_for(module: nn.Module) -> type[Handler]:
    for pred, cls in HANDLERS:
        if pred(module):
            return cls
    return FallbackHandler
