"""Capture, in one forward/backward, everything needed for per-row gradients of every trainable parameter.

``Capture(model)`` finds each module that owns trainable parameters and installs a handler chosen by module type
(``geometry/handlers.py``: factored Linear / Conv1D / Embedding, LayerNorm / RMSNorm, and an exact per-row
fallback for everything else). Parameters are grouped into *blocks* (a module's weight and bias; modules sharing a
tied weight merge into one block). Layer scope = one selection per block.

The accounting guarantee (checked after every captured backward, before anything reaches ``.grad``):

* a weight or bias owned by a factored handler must receive *no* gradient from autograd (its handler's functions
  return none): one that does is used outside its module's forward (``F.linear(x, other.weight)``, a parameter an
  adapter wraps directly), and the step is refused;
* every other trainable parameter's per-row gradients must sum to the gradient autograd computes for it in the same
  backward (relative to the per-row magnitudes: 1e-6 in float64, 1e-3 in float32, 3e-2 in 16-bit): a parameter also
  used outside its module, an unusual norm formula or a module that is not row-separable is refused.
A refusal is an ``UnsupportedModelError`` naming the parameter and what to do; ``.grad`` is left as it was.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from drpost.geometry.factors import Block, Use
from drpost.geometry.handlers import (
    HANDLERS,
    Conv1DHandler,
    FallbackHandler,
    Handler,
    LinearHandler,
    UnsupportedModelError,
    handler_for,
)

__all__ = ["HANDLERS", "Block", "Capture", "Handler", "UnsupportedModelError", "Use", "handler_for"]

# per-row gradients must sum to autograd's gradient within this share of sum_r ||g_r|| (by parameter dtype)
CHECK_RTOL = {torch.float64: 1e-6, torch.float32: 1e-3}
CHECK_RTOL_16BIT = 3e-2


class Capture:
    """Context manager: installs handlers on every module owning trainable parameters.

    ``linear_only=True`` captures only Linear/Conv1D (and PEFT LoRA's inner Linear) layers; other trainable
    parameters are frozen for the duration of the step (the user asked for "linear layers only").
    ``materialize=True`` (default): a Linear/Conv1D weight alone in its block whose per-row gradients take no more
    memory than its factors (a LoRA matrix: p q <= T (p + q)) gets them computed in the backward, and its factors
    are freed there as a plain backward frees them (``Block.rows``); False keeps every weight's factors.
    Before each forward, ``start(rows, tokens)`` tells the handlers the merged batch's shape (R, T).
    """

    def __init__(self, model: nn.Module, linear_only: bool = False, materialize: bool = True):
        self.model = model
        self.rows = 0
        self.tokens = 0
        self.handlers: list[Handler] = []
        self.frozen: list[nn.Parameter] = []
        self.installed = False
        fallbacks: dict[str, FallbackHandler] = {}
        holders: dict[int, list[str]] = {}  # a parameter -> the modules that hold it directly (ties: several)
        for name, mod in model.named_modules():
            for p in mod.parameters(recurse=False):
                holders.setdefault(id(p), []).append(name)
        for name, mod in model.named_modules():
            # an alias of a descendant's parameter (BERT's head.bias is head.decoder.bias) belongs to the descendant
            own = {n: p for n, p in mod.named_parameters(recurse=False)
                   if p.requires_grad and not any(_below(h, name) for h in holders[id(p)])}
            if not own:
                continue
            cls = handler_for(mod)
            if linear_only and cls not in (LinearHandler, Conv1DHandler):
                self.frozen += list(own.values())
                continue
            anc = _nearest(fallbacks, name)
            if anc is not None:  # a fallback module owns its whole subtree (its replays cover every use inside it)
                rel = name[len(anc.name) + 1:] if anc.name else name
                anc.trainable.update({f"{rel}.{n}": p for n, p in own.items()})
                continue
            h = cls(mod, name, self)
            if isinstance(h, FallbackHandler):
                fallbacks[name] = h
            self.handlers.append(h)
        if not self.handlers:
            raise ValueError("the model has no trainable parameters (every requires_grad is False)")
        self.blocks = self._make_blocks()
        alone = [self.block_of.count(self.block_of[i]) == 1 for i in range(len(self.handlers))]
        for h, single in zip(self.handlers, alone, strict=True):  # materialize small per-row gradients in the backward
            if isinstance(h, (LinearHandler, Conv1DHandler)):
                h.materialize = materialize and single
        self.param_names = {p: (f"{h.name}.{n}" if h.name else n) for h in self.handlers for n, p in h.trainable.items()}
        self.checked = list({id(p): p for h in self.handlers for p in h.checked_params()}.values())
        checked = {id(p) for p in self.checked}
        self.owned = [p for h in self.handlers for p in h.trainable.values() if id(p) not in checked]
        self._autograd: dict[nn.Parameter, Tensor] = {}

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

    def start(self, rows: int, tokens: int) -> None:
        """The merged batch about to run: R rows of T tokens."""
        self.rows, self.tokens = int(rows), int(tokens)

    def __enter__(self) -> Capture:
        for h in self.handlers:
            h.install()
        for p in self.frozen:
            p.requires_grad_(False)
        self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handlers:
            h.remove()
        for p in self.frozen:
            p.requires_grad_(True)
        self.installed = False

    @contextlib.contextmanager
    def uninstalled(self):
        """Run plain module forwards for a while (the fallback's per-row replays), then restore the handlers."""
        was = self.installed
        if was:
            for h in self.handlers:
                h.remove()
        try:
            yield
        finally:
            if was:
                for h in self.handlers:
                    h.install()

    def backward(self, loss: Tensor) -> None:
        """Back-propagate ``loss`` with the handlers installed; autograd's own gradients of the parameters are kept
        aside for the accounting check (``collect``) and ``.grad`` is left exactly as it was.

        The handlers stay installed during the backward because activation checkpointing re-runs forwards there:
        the recomputation must go through the same capture functions as the original forward."""
        stash = {p: p.grad for p in self.owned + self.checked}  # the caller's gradients, put back below
        for p in stash:
            p.grad = None
        try:
            with self:
                loss.backward()
        finally:
            self._autograd = {p: p.grad for p in stash if p.grad is not None}
            for p, g in stash.items():
                p.grad = g

    def collect(self) -> list[Block]:
        """After the backward: fill every block with its uses and small per-row gradients, then check that every
        trainable parameter's gradient is accounted for (module docstring). Raises ``UnsupportedModelError``."""
        for b in self.blocks:
            b.clear()
        try:
            for i, h in enumerate(self.handlers):
                h.finish(self.blocks[self.block_of[i]])
            self._account()
        except Exception:
            self.reset()
            raise
        finally:
            self._autograd = {}
        return self.blocks

    def _account(self) -> None:
        for p in self.owned:
            if p in self._autograd:
                raise UnsupportedModelError(
                    f"drpost: parameter {self.param_names[p]!r} is also used outside its module's forward (e.g. "
                    "F.linear(x, module.weight) elsewhere in the model, or an adapter that wraps the parameter "
                    "directly), so its per-sample gradients are not all captured. Freeze it "
                    "(requires_grad_(False)), leave it out of LoRA's target_modules, or call the module instead.")
        small = {p: g for b in self.blocks for p, g in b.small.items()}
        for p in self.checked:
            rows = small.get(p)  # (R, numel) or None
            auto = self._autograd.get(p)
            if rows is None and auto is None:
                continue
            got = rows.sum(0) if rows is not None else torch.zeros_like(auto).flatten()
            ref = auto.flatten().to(got.dtype) if auto is not None else torch.zeros_like(got)
            scale = max(float(rows.norm(dim=1).sum()) if rows is not None else 0.0, float(ref.norm()), 1e-30)
            err = float((got - ref).norm()) / scale
            tol = CHECK_RTOL.get(p.dtype, CHECK_RTOL_16BIT)
            if not err <= tol:
                raise UnsupportedModelError(
                    f"drpost: the per-sample gradients of parameter {self.param_names[p]!r} do not add up to its "
                    f"gradient (relative difference {err:.2e} > {tol:g}): it is used outside its module's forward, "
                    "or its module is not separable by rows (it mixes samples, or holds per-batch state). Freeze "
                    "it (requires_grad_(False)) or leave it out of LoRA's target_modules.")

    def reset(self) -> None:
        for h in self.handlers:
            h.reset()
        for b in self.blocks:
            b.clear()


def _below(name: str, ancestor: str) -> bool:
    return name != ancestor and (ancestor == "" or name.startswith(ancestor + "."))


def _nearest(fallbacks: dict[str, FallbackHandler], name: str) -> FallbackHandler | None:
    """The closest ancestor of module ``name`` that has a fallback handler."""
    parts = name.split(".")
    for k in range(len(parts) - 1, -1, -1):
        anc = ".".join(parts[:k])
        if anc in fallbacks:
            return fallbacks[anc]
    return None
