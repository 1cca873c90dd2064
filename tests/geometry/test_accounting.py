"""The capture's accounting guarantee: every trainable parameter's gradient is exact or the step is refused.

Each case builds a small module that breaks one assumption of the per-module handlers (a weight used outside its
module, an embedding subclass with its own forward, a parameter used functionally by its parent, outputs computed
from other outputs) and checks the step against per-row autograd gradients of the same forward, or checks that it is
refused with ``UnsupportedModelError`` before ``.grad`` or the weights change.
"""

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import batch, tiny_model
from torch import nn

import drpost
from drpost.geometry.capture import Capture, UnsupportedModelError
from drpost.objectives import causal_lm_loss

V, D = 32, 8


class _Out:
    def __init__(self, logits):
        self.logits = logits


class ToyLM(nn.Module):
    """Embedding -> body -> head; ``head_use`` picks how the head weight is applied."""

    def __init__(self, emb: nn.Module, body: nn.Module | None = None, head_use: str = "module"):
        super().__init__()
        self.emb, self.body, self.head_use = emb, body or nn.Identity(), head_use
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, input_ids, attention_mask=None, **_):
        h = self.body(self.emb(input_ids))
        if self.head_use == "functional":  # the head weight used outside its module's forward
            return _Out(F.linear(h, self.head.weight))
        return _Out(self.head(h))


class ScaledEmbedding(nn.Embedding):
    """Like Gemma's: the lookup times a scale, in the subclass's own forward."""

    def forward(self, ids):
        return super().forward(ids) * 3.0


class OffsetPositions(nn.Embedding):
    """Like OPT's learned positions: another signature, an offset, then the lookup."""

    def forward(self, input_ids, offset: int = 2):
        pos = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        return input_ids.new_zeros(()).double() + super().forward(pos + offset)


class TokPlusPos(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, D), OffsetPositions(V, D)

    def forward(self, ids):
        return self.tok(ids) + self.pos(ids, offset=2)


class FunctionalConvMixer(nn.Module):
    """Owns a parameter (no kernel: fallback) and uses its child's weight functionally (like a state-space mixer)."""

    def __init__(self):
        super().__init__()
        self.decay = nn.Parameter(torch.rand(D))
        self.conv = nn.Conv1d(D, D, 3, groups=D, padding=2)
        self.proj = nn.Linear(D, D)

    def forward(self, x):  # (R, T, D), causal depthwise conv by hand from the child's weight
        y = F.conv1d(x.transpose(1, 2), self.conv.weight, self.conv.bias, padding=2, groups=D)[..., : x.shape[1]]
        return self.proj(torch.tanh(y.transpose(1, 2)) * self.decay)


class Router(nn.Module):
    """Token-flattened input, two outputs where the second is computed from the first (like an MoE router)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, D))

    def forward(self, x):  # x (R*T, D)
        logits = F.linear(x, self.weight)
        return logits, torch.softmax(logits, -1)


class RoutedBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = Router()
        self.out = nn.Linear(4, D)

    def forward(self, h):
        R, T, _ = h.shape
        _, probs = self.router(h.reshape(-1, D))
        return h + self.out(probs).reshape(R, T, D)


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    m = {
        "scaled": lambda: ToyLM(ScaledEmbedding(V, D, padding_idx=0)),
        "positions": lambda: ToyLM(TokPlusPos()),
        "mixer": lambda: ToyLM(nn.Embedding(V, D), FunctionalConvMixer()),
        "router": lambda: ToyLM(nn.Embedding(V, D), RoutedBody()),
        "outside": lambda: ToyLM(nn.Embedding(V, D), head_use="functional"),
    }[kind]()
    return m.double()


def _batches(seed: int = 0):
    b = batch(6, seed=seed, T=7)
    for k in ("input_ids", "labels"):
        b[k] = torch.where(b[k] >= V, b[k] % V, b[k])
    gen = {k: v[:4] for k, v in b.items()}
    tgt = {k: v[4:] for k, v in b.items()}
    return gen, tgt


def per_row_grads(model, gen, tgt):
    """Per-row gradients of one plain forward of the merged batch (no capture): (R, P), counts (R,)."""
    merged = drpost.step.merge_batches(gen, tgt, "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    loss, counts = causal_lm_loss(model, merged)
    rows = []
    for r in range(loss.shape[0]):
        gs = torch.autograd.grad(loss[r], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, gs)]))
    return torch.stack(rows), counts.to(torch.float64), params


def _flat_grad(params):
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params])


@pytest.mark.parametrize("kind", ["scaled", "positions", "mixer", "router"])
@pytest.mark.parametrize("method", ["full_training", "global_subset"])
def test_modules_beyond_the_kernels_are_exact(kind, method):
    model = _model(kind)
    gen, tgt = _batches()
    U, counts, params = per_row_grads(model, gen, tgt)
    n = gen["input_ids"].shape[0]
    g_T = U[n:].sum(0) / counts[n:].sum()
    reg = drpost.DataRegularizer(model, method, **({"frac": 0.5} if method == "global_subset" else {}))
    rep = reg.step(gen, tgt, causal_lm_loss)
    got = _flat_grad(params)
    scores = U[:n] @ g_T
    if method == "full_training":
        keep = list(range(n))
    else:
        keep = torch.topk(scores, 2).indices.tolist()
        assert torch.allclose(rep.scores, scores, rtol=1e-9, atol=1e-12 * scores.abs().max())
    want = U[keep].sum(0) / counts[keep].sum()
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12 * want.abs().max()), (got - want).abs().max()


@pytest.mark.parametrize("assembly", ["one_pass", "two_pass"])
@pytest.mark.parametrize("method,kw", [("full_training", {"report_scores": True}), ("global_subset", {}),
                                       ("layerwise_subset", {})])
def test_parameter_used_outside_its_module_is_refused_and_nothing_changes(method, kw, assembly):
    model = _model("outside")
    gen, tgt = _batches()
    for p in model.parameters():  # accumulated gradients from an earlier micro-batch must survive
        p.grad = torch.full_like(p, 0.5)
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    reg = drpost.DataRegularizer(model, method, assembly=assembly, **kw)
    with pytest.raises(UnsupportedModelError, match="'head.weight'.*outside its module"):
        reg.step(gen, tgt, causal_lm_loss)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and torch.equal(p.grad, before[n][1]), n
    # the capture is left clean: the same regularizer works once the model is fixed
    model.head_use = "module"
    assert reg.step(gen, tgt, causal_lm_loss)


@pytest.mark.parametrize("assembly", ["one_pass", "two_pass"])
@pytest.mark.parametrize("method", ["full_training", "target_only"])
def test_fixed_weight_sets_need_no_capture_and_train_any_model(method, assembly):
    """full_training / target_only weigh rows by token counts alone: one ordinary backward, so a model whose
    per-row gradients cannot be captured (a head weight used outside its module) still gets the exact update."""
    model = _model("outside")
    gen, tgt = _batches()
    U, counts, params = per_row_grads(model, gen, tgt)
    n = gen["input_ids"].shape[0]
    rows = range(n) if method == "full_training" else range(n, U.shape[0])
    want = U[list(rows)].sum(0) / counts[list(rows)].sum()
    for p in model.parameters():  # added to what an earlier micro-batch left
        p.grad = torch.full_like(p, 0.5)
    rep = drpost.DataRegularizer(model, method, assembly=assembly).step(gen, tgt, causal_lm_loss)
    assert rep and rep.scoring == {}
    got = _flat_grad(params) - 0.5
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12 * want.abs().max()), (got - want).abs().max()


def test_unusual_norm_formula_is_refused_not_wrong():
    class OddRMSNorm(nn.Module):  # named like an RMSNorm, but scales by the mean absolute value
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(D) + 0.5)

        def forward(self, x):
            return self.weight * x / x.abs().mean(-1, keepdim=True)

    model = ToyLM(nn.Embedding(V, D), OddRMSNorm()).double()
    gen, tgt = _batches()
    with pytest.raises(UnsupportedModelError, match="body.weight.*do not add up"):
        drpost.DataRegularizer(model, "global_subset").step(gen, tgt, causal_lm_loss)


def test_full_training_refuses_a_scope_without_slack():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="option 'scope'"):
        drpost.DataRegularizer(model, "full_training", scope="layer")
    with pytest.raises(ValueError, match="option 'scope'"):
        drpost.DataRegularizer(model, "target_only", scope="layer")
    drpost.DataRegularizer(model, "full_training", scope="layer", slack=0.1)  # scopes the slack ball: allowed


def test_capture_restores_forwards_it_replaced():
    model = _model("scaled")
    fwd = model.emb.forward
    model.head.forward = lambda x: F.linear(x, model.head.weight)  # an instance-level forward (accelerate does this)
    inst = model.head.forward
    cap = Capture(model)
    with cap:
        assert model.head.forward is not inst
    assert model.head.forward is inst and model.emb.forward == fwd and "forward" not in model.emb.__dict__
