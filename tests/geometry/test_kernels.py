"""Every kernel and scoring method against the fp64 torch.func oracle (drpost.geometry.oracle).

Models: tiny Llama (untied), Qwen2 (qkv bias, tied embeddings), GPT-2 (Conv1D, tied embeddings, learned positions),
each full and with PEFT LoRA; batches with padding, unequal lengths and multi-row samples.
"""

import pytest
import torch
from tests.helpers import ORACLE_RTOL, batch, tiny_model

from drpost.geometry.capture import Capture
from drpost.geometry.kernels import Sketcher, assemble, block_stats
from drpost.geometry.oracle import reference_geometry
from drpost.objectives import causal_lm_loss
from drpost.step import merge_batches

FAMILIES = ["llama", "qwen2", "gpt2"]


def captured(model, gen, tgt, materialize=True):
    """Run the capture by hand: merged forward, one backward. Returns (capture, blocks, tc, R_g)."""
    merged = merge_batches(gen, tgt, "cpu")
    R_g, R = gen["input_ids"].shape[0], merged["input_ids"].shape[0]
    cap = Capture(model, materialize=materialize)
    with cap:
        cap.start(R, merged["input_ids"].shape[1])
        loss, counts = causal_lm_loss(model, merged)
    cap.backward(loss.sum())
    blocks = cap.collect()
    tc = torch.zeros(R, dtype=torch.float64)
    tc[R_g:] = 1.0 / counts[R_g:].sum()
    return cap, blocks, tc, R_g


def block_slices(model, blocks, names):
    """Column indices of each block's parameters in the oracle's flattened (n, P) layout."""
    params = dict(model.named_parameters())
    offsets, o = {}, 0
    for k in names:
        offsets[id(params[k])] = (o, o + params[k].numel())
        o += params[k].numel()
    return [torch.cat([torch.arange(*offsets[id(p)]) for p in b.params]) for b in blocks]


@pytest.fixture(scope="module", params=[(f, lora, mat) for f in FAMILIES for lora in (False, True)
                                        for mat in (False, True)],
                ids=lambda x: f"{x[0]}{'-lora' if x[1] else ''}{'-rows' if x[2] else '-factors'}")
def setup(request):
    """``-rows``: small per-row gradients materialized in the backward (the default); ``-factors``: every kernel on
    the factors."""
    fam, lora, mat = request.param
    model = tiny_model(fam, lora=lora)
    gen = batch(5, seed=1, T=9)  # rows are samples here; merged per-row Gram = per-sample Gram
    tgt = batch(2, seed=2, T=7)
    ref = reference_geometry(model, gen, tgt, causal_lm_loss)
    cap, blocks, tc, R_g = captured(model, gen, tgt, materialize=mat)
    held = [b for b in blocks if b.rows is not None]
    assert bool(held) == mat  # both paths are exercised: some weights are small enough to hold, none without
    assert all(not us for b in held for us in b.factored.values())  # held rows replace the factors
    cols = block_slices(model, blocks, ref["names"])
    return model, ref, blocks, tc, R_g, cols


@pytest.mark.parametrize("method", ["full_ghost", "reduced_ghost", "direct"])
def test_scores_and_gram_match_oracle_per_block(setup, method):
    model, ref, blocks, tc, R_g, cols = setup
    U, UT, gT = ref["u"], ref["u_target"], ref["g_T"]
    need_gram = method != "reduced_ghost"
    for l, (b, c) in enumerate(zip(blocks, cols)):
        st = block_stats(b, l, method, tc, R_g, need_gram, need_gram)
        u, ut, g = U[:, c], UT[:, c], gT[c]
        scale = (u.norm(dim=1).max() * g.norm()).clamp_min(1e-30)
        assert torch.allclose(st.row_scores, u @ g, atol=ORACLE_RTOL * scale, rtol=0), b.name
        assert torch.allclose(st.target_sq, g @ g, rtol=ORACLE_RTOL, atol=1e-30), b.name
        if need_gram:
            assert torch.allclose(st.row_gram, u @ u.t(), rtol=ORACLE_RTOL, atol=ORACLE_RTOL * u.norm() ** 2), b.name
            assert torch.allclose(st.target_row_gram, ut @ ut.t(), rtol=ORACLE_RTOL, atol=ORACLE_RTOL * ut.norm() ** 2)


def test_every_trainable_parameter_is_in_exactly_one_block(setup):
    model, ref, blocks, *_ = setup
    ids = [id(p) for b in blocks for p in b.params]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}


def test_assembly_matches_oracle_weighted_sum(setup):
    model, ref, blocks, tc, R_g, cols = setup
    U, UT = ref["u"], ref["u_target"]
    g = torch.Generator().manual_seed(3)
    coef = torch.randn(R_g + UT.shape[0], generator=g, dtype=torch.float64)
    params = dict(model.named_parameters())
    expected = coef[:R_g] @ U + coef[R_g:] @ UT
    got = {}
    for b in blocks:
        got.update(assemble(b, coef))
    flat = torch.cat([got[params[k]].reshape(-1) for k in ref["names"]])
    assert torch.allclose(flat, expected, rtol=ORACLE_RTOL, atol=ORACLE_RTOL * expected.abs().max())


def test_tied_embeddings_are_one_block_with_two_uses():
    model = tiny_model("qwen2")
    cap, blocks, _, _ = captured(model, batch(3, seed=1), batch(1, seed=2))
    tied = [b for b in blocks if any(len(us) == 2 for us in b.factored.values())]
    assert len(tied) == 1 and "embed_tokens" in tied[0].name and "lm_head" in tied[0].name


def test_compress_error_shrinks_with_sketch_size_and_is_unbiased():
    model = tiny_model("llama")
    gen, tgt = batch(4, seed=1), batch(1, seed=2)
    ref = reference_geometry(model, gen, tgt, causal_lm_loss)
    K = ref["u"] @ ref["u"].t()
    cap, blocks, tc, R_g = captured(model, gen, tgt)

    def sketched_gram(k, seed):
        sk = Sketcher(k, k, seed=seed)
        return sum(block_stats(b, l, "compress", tc, R_g, True, False, sk).row_gram for l, b in enumerate(blocks))

    errs = {}
    for k in (4, 16):
        grams = [sketched_gram(k, s) for s in range(24)]
        errs[k] = torch.stack([(G - K).norm() / K.norm() for G in grams]).mean()
        if k == 4:  # unbiased: the mean over seeds is much closer than a single draw
            mean_err = (torch.stack(grams).mean(0) - K).norm() / K.norm()
            assert mean_err < 0.5 * errs[k]
    assert errs[16] < errs[4]
    exact = sketched_gram(10_000, 0)  # k >= every dimension: identity sketch, exact
    assert torch.allclose(exact, K, rtol=1e-9, atol=1e-12 * K.abs().max())


def test_fallback_module_gets_exact_per_sample_gradients_with_one_warning():
    """A module type without a kernel: exact per-row gradients via torch.func, warned once, never dropped."""

    class Scale(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.s = torch.nn.Parameter(torch.randn(d, dtype=torch.float64))

        def forward(self, x):
            return x * torch.tanh(self.s)

    model = tiny_model("llama")
    layer = model.model.layers[0]
    scale = Scale(16)
    orig = layer.mlp.forward
    layer.mlp.scale = scale
    layer.mlp.forward = lambda x: scale(orig(x))
    gen, tgt = batch(3, seed=1), batch(1, seed=2)
    ref = reference_geometry(model, gen, tgt, causal_lm_loss)
    with pytest.warns(UserWarning, match="no kernel for Scale"):
        cap, blocks, tc, R_g = captured(model, gen, tgt)
    b = next(b for b in blocks if b.name.endswith("scale"))
    col = block_slices(model, [b], ref["names"])[0]
    st = block_stats(b, 0, "direct", tc, R_g, True, False)
    u = ref["u"][:, col]
    assert torch.allclose(st.row_gram, u @ u.t(), rtol=1e-10)
    assert torch.allclose(st.row_scores, u @ ref["g_T"][col], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("d_in,d_out", [(40, 4), (4, 40), (4, 4), (40, 24)])
def test_narrow_products_match_the_plain_formulas(d_in, d_out):
    """A narrow output (<= NARROW_COLS columns) is computed transposed: the same values as the plain products, in
    the per-row gradients, the weighted sum and the capture functions' forward and input gradient."""
    from drpost.geometry.factors import outer_sum, per_row
    from drpost.geometry.functions import _LinearFn

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, d_in, generator=g, dtype=torch.float64)  # (R, T, d_in)
    b = torch.randn(3, 5, d_out, generator=g, dtype=torch.float64)  # (R, T, d_out)
    c = torch.randn(3, generator=g, dtype=torch.float64)
    ref = torch.einsum("rtp,rtq->rpq", b, a)  # (R, d_out, d_in)
    assert torch.allclose(per_row(b, a), ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(outer_sum(b, a, c), torch.einsum("r,rpq->pq", c, ref), rtol=1e-12, atol=1e-12)

    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    bias = torch.randn(d_out, generator=g, dtype=torch.float64)

    class Rec:
        def record(self, x, dy):
            self.dy = dy

    for bi in (None, bias):
        x1, x2 = a.clone().requires_grad_(), a.clone().requires_grad_()
        y1 = _LinearFn.apply(x1, w, bi, Rec())
        y2 = torch.nn.functional.linear(x2, w, bi)
        assert torch.allclose(y1, y2, rtol=1e-12, atol=1e-12) and y1.is_contiguous()
        y1.backward(b)
        y2.backward(b)
        assert torch.allclose(x1.grad, x2.grad, rtol=1e-12, atol=1e-12) and x1.grad.shape == a.shape


@pytest.mark.parametrize("chunk_bytes", [1, 20000])  # one parameter row per chunk, or several
def test_direct_beyond_its_budget_scores_in_chunks(setup, monkeypatch, chunk_bytes):
    """``direct`` over ``kernels.DIRECT_MAX_BYTES`` (SmolLM2's tied 49,152 x 576 embedding / LM head: ~1 GB for 9
    rows) builds the per-row gradients a few parameter rows at a time: the same scores and Grams as the oracle, no
    rows kept (the factors stay for the assembly), in ``block_stats`` and in the batched ``row_products``."""
    from drpost.geometry import kernels

    model, ref, blocks, tc, R_g, cols = setup
    U, UT, gT = ref["u"], ref["u_target"], ref["g_T"]
    monkeypatch.setattr(kernels, "DIRECT_MAX_BYTES", 1)  # every block over the budget...
    monkeypatch.setattr(kernels, "DIRECT_CHUNK_BYTES", chunk_bytes)  # ...in chunks
    chunked = [b for b in blocks if kernels._uses(b)]
    if not chunked:
        pytest.skip("every weight holds its per-row gradients from the backward: nothing to chunk")
    for l, (b, c) in enumerate(zip(blocks, cols)):
        if b not in chunked:
            continue
        st = block_stats(b, l, "direct", tc, R_g, True, True)
        u, ut, g = U[:, c], UT[:, c], gT[c]
        scale = (u.norm(dim=1).max() * g.norm()).clamp_min(1e-30)
        assert st.rows is None, b.name
        assert torch.allclose(st.row_scores, u @ g, atol=ORACLE_RTOL * scale, rtol=0), b.name
        assert torch.allclose(st.target_sq, g @ g, rtol=ORACLE_RTOL, atol=1e-30), b.name
        assert torch.allclose(st.row_gram, u @ u.t(), rtol=ORACLE_RTOL, atol=ORACLE_RTOL * u.norm() ** 2), b.name
        assert torch.allclose(st.target_row_gram, ut @ ut.t(), rtol=ORACLE_RTOL, atol=ORACLE_RTOL * ut.norm() ** 2)
        P, kept = kernels.row_products(b, R_g, tc, full=True)  # (R, R): every row against every row
        full = torch.cat([u, ut]) if P.shape[0] == u.shape[0] + ut.shape[0] else None
        assert kept is None and full is not None
        want = full @ full.t()
        assert torch.allclose(P, want, rtol=ORACLE_RTOL, atol=ORACLE_RTOL * full.norm() ** 2), b.name


def _tied_head(R: int, T: int, k: int | None = None):
    """SmolLM2's tied 49,152 x 576 embedding / LM head as a block of meta tensors: the lookup at T positions, the
    head at the last k (T where None)."""
    from types import SimpleNamespace

    from drpost.geometry.factors import OneHot

    k = T if k is None else k
    lm_head = SimpleNamespace(a=torch.empty(R, k, 576, device="meta"), b=torch.empty(R, k, 49152, device="meta"))
    lookup = SimpleNamespace(a=OneHot(torch.empty(R, T, device="meta"), 49152),
                             b=torch.empty(R, T, 576, device="meta"))
    return SimpleNamespace(rows=None, factored={torch.empty(49152, 576, device="meta"): [lm_head, lookup]})


def test_auto_prices_a_large_block_by_time_and_chunks_it(monkeypatch):
    """``scoring=auto`` keeps ``direct`` for a block of any size (it is chunked beyond the budget): for the tied
    SmolLM2 head it picks full ghost for scores and for a Gram of 9 rows at T=64, direct for a Gram at T=256 or of 33
    rows (as measured: cost.choose). End to end, chunking
    changes nothing but memory: the hull step with a 1-byte budget fills the same ``.grad``."""
    from drpost.geometry import cost, kernels

    rates = cost.Rates(flops_per_s=84e9, bytes_per_s=15.8e9)  # these CPUs, one thread
    assert cost.choose(_tied_head(9, 64), 8, 1, 64, False, rates) == "full_ghost"
    assert cost.choose(_tied_head(9, 64), 8, 1, 64, True, rates) == "full_ghost"
    assert cost.choose(_tied_head(9, 256), 8, 1, 256, True, rates) == "direct"
    assert cost.choose(_tied_head(33, 64), 32, 1, 64, True, rates) == "direct"

    from tests.helpers import batch, tiny_model

    import drpost
    from drpost.objectives import causal_lm_loss

    grads = []
    for budget in (kernels.DIRECT_MAX_BYTES, 1):
        monkeypatch.setattr(kernels, "DIRECT_MAX_BYTES", budget)
        monkeypatch.setattr(kernels, "DIRECT_CHUNK_BYTES", budget)
        model = tiny_model("llama")
        reg = drpost.DataRegularizer(model, method="hull", scoring="direct")
        rep = reg.step(batch(4, seed=0), batch(1, seed=1), causal_lm_loss)
        assert rep, rep.skip_reason
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_cost_model_prices_each_use_at_its_own_positions():
    """An LM head that runs only on the loss window (k of T positions) is priced at k: the Gram over 9 rows at T=256
    goes to full ghost when the head saw the last 8 positions (8^2 token pairs, not 256^2), and a use's positions
    enter every method's terms as a single use at that length would."""
    from drpost.geometry import cost

    rates = cost.Rates(flops_per_s=84e9, bytes_per_s=15.8e9)
    assert cost.choose(_tied_head(9, 256, k=8), 8, 1, 256, True, rates) == "full_ghost"
    assert cost.block_shapes(_tied_head(9, 256, k=8), dense_uses=True) == [(49152, 576, 1, 8)]
    assert cost.block_shapes(_tied_head(9, 256, k=8)) == [(49152, 576, 2, 264)]
    assert cost.positions(_tied_head(9, 256, k=8)) == 264
    for need_gram in (False, True):
        at_k = cost.method_costs([(1536, 576, 1)], 8, 1, 8, need_gram, rates)
        assert cost.method_costs([(1536, 576, 1, 8)], 8, 1, 256, need_gram, rates) == at_k
        two_uses = cost.method_costs([(1536, 576, 2)], 8, 1, 64, need_gram, rates)
        assert cost.method_costs([(1536, 576, 2, 128)], 8, 1, 999, need_gram, rates) == two_uses
    assert cost.compress_seconds([(1536, 576, 1, 8)], 8, 1, 256, 64, 64, True, rates) == \
        cost.compress_seconds([(1536, 576, 1)], 8, 1, 8, 64, 64, True, rates)


def test_a_new_loss_window_is_priced_again():
    """The step caches the cost model's choice per block shape; the positions the uses ran on are part of the key,
    so a batch whose loss window is shorter (same T) is priced again rather than given the old choice."""
    from tests.helpers import batch, tiny_model

    import drpost
    from drpost.objectives import causal_lm_loss

    model = tiny_model("llama")
    reg = drpost.DataRegularizer(model, method="layerwise_subset", frac=0.5)
    gen, tgt = batch(4, seed=0), batch(1, seed=1)
    assert reg.step(gen, tgt, causal_lm_loss)
    keys = set(reg._choice)
    T = gen["labels"].shape[1]
    for b in (gen, tgt):
        b["labels"][:, : T // 2] = -100  # a prompt: the LM head runs on the last half only
    assert reg.step(gen, tgt, causal_lm_loss)
    new = set(reg._choice) - keys
    assert new and all(k[3] == T for k in new)
    head = {k[0] for k in new}
    assert {k[0] for k in keys} >= head and len(new) < len(keys)  # the head's block, not the layers, is new


@pytest.mark.parametrize("cols", [7, 4096 + 5])
def test_mm32_runs_bf16_products_into_a_float32_result(monkeypatch, cols):
    """``mm32``: the GEMM in the operands' dtype, its result float32, written (or added) column chunk by chunk; the
    bf16 result differs from the float32 product of the same bf16 values by the GEMM's one output rounding only."""
    from drpost.geometry import factors

    monkeypatch.setattr(factors, "MM_CHUNK_ELEMS", 64 * 40)  # a few chunks over the wide case, one over the narrow
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 48, generator=g).bfloat16(), torch.randn(48, cols, generator=g).bfloat16()
    ref = x.double() @ y.double()
    got = factors.mm32(x, y)
    assert got.dtype == torch.float32 and got.shape == (64, cols)
    assert float((got.double() - ref).abs().max() / ref.abs().max()) <= 2**-8  # one bf16 rounding of the result
    acc = torch.ones(64, cols)
    assert factors.mm32(x, y, acc) is acc and torch.equal(acc, 1 + got)  # added in place, the same chunks
    x32, y32 = x.float(), y.float()
    assert torch.equal(factors.mm32(x32, y32), x32 @ y32)  # float32 operands: the plain product


@pytest.mark.parametrize("R", [1, 5, 8, 9, 16, 17, 33])
def test_row_gram_is_the_symmetric_gram_of_the_rows(R):
    """``row_gram``: f f^T from one GEMM over the first 8k / 16k columns and a small corner block, symmetric."""
    from drpost.geometry.factors import row_gram

    f = torch.randn(R, 301, generator=torch.Generator().manual_seed(R), dtype=torch.float64)
    P = row_gram(f)
    assert P.shape == (R, R) and torch.allclose(P, P.t(), rtol=0, atol=1e-12)
    assert torch.allclose(P, f @ f.t(), rtol=1e-12, atol=1e-12)


def test_bf16_factors_multiply_in_bf16_and_sum_in_float32():
    """Ghost scores and the assembly from bf16 factors: bf16 products (product_dtype), float32 results, within the
    stated tolerance of the same factors multiplied in float64."""
    from drpost.geometry.factors import Use, product_dtype
    from drpost.geometry.kernels import _ghost_pair, _weighted_outer

    assert product_dtype(torch.bfloat16) == torch.bfloat16 and product_dtype(torch.float16) == torch.float32
    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(5, 16, 96, generator=g).bfloat16(), torch.randn(5, 16, 80, generator=g).bfloat16()
    u = Use(a=a, b=b, transposed=False)
    K = _ghost_pair(u, u, slice(0, 5), slice(0, 5), torch.float32)  # (5, 5) Gram of per-row gradients
    G = torch.einsum("rtd,rte->rde", b.double(), a.double()).reshape(5, -1)  # (5, 96 * 80) per-row gradients
    assert K.dtype == torch.float32 and torch.allclose(K.double(), G @ G.t(), rtol=2e-2, atol=2e-2 * float(K.abs().max()))
    keep = torch.tensor([0, 2, 3])
    for uniform, coef in ((0.5, torch.tensor([0.5, 0, 0.5, 0.5, 0])), (None, torch.tensor([0.3, 0, 0.1, 0.7, 0]))):
        out = _weighted_outer(b, a, coef, keep, uniform, torch.float32)  # (96, 80) sum_r c_r B_r^T A_r
        ref = (coef.double()[:, None] * G).sum(0).reshape(96, 80)
        assert out.dtype == torch.float32 and _close(out, ref)


def _close(x, ref, rtol=2e-2):
    return float((x.double() - ref).norm() / ref.norm()) <= rtol
