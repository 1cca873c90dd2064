"""The exactness matrix (issue 15): every causal-LM architecture transformers ships, as a tiny fp64 model, is either
exact against the per-row autograd oracle or refused with ``UnsupportedModelError`` — never silently wrong.

Cells: model type x {full fine-tuning + full_training, full + global_subset, LoRA all-linear r=4 + global_subset},
plus the flipped ``tie_word_embeddings`` for full + global_subset where the config has it. A cell passes when
``.grad``, scores, weights and losses agree to 1e-6 relative (tests/geometry/zoo.py), or when the step raises
``UnsupportedModelError`` and the cell is listed in ``REFUSED`` with the reason. An expected refusal that became
exact fails, so the list stays true. Types that cannot be built tiny and text-only offline are skipped with the
reason. ``scripts/arch_matrix.py`` prints the same matrix as a table.
"""

from __future__ import annotations

import pytest
from tests.geometry import zoo

FULL_FT, FULL_GS, LORA_GS = (v[0] for v in zoo.VARIANTS)
ALL = (FULL_FT, FULL_GS, LORA_GS)


def _both_full(types: str, reason: str) -> dict[tuple[str, str], str]:
    return {(t, v): reason for t in types.split() for v in (FULL_FT, FULL_GS)}


def _lora(types: str, reason: str) -> dict[tuple[str, str], str]:
    return {(t, LORA_GS): reason for t in types.split()}


# (model_type, variant) -> why drpost refuses it (the error is UnsupportedModelError; the reason is for readers).
# An entry covers the flipped tie_word_embeddings too, unless (model_type, variant, tie) says otherwise.
REFUSED: dict[tuple, str] = {
    **_lora("afmoe cohere2_moe deepseek_v2 dots1 ernie4_5_moe exaone_moe flex_olmo glm4_moe glm4_moe_lite hunyuan_v1_moe "
            "longcat_flash mellum minimax minimax_m2 mixtral olmoe qwen3_moe qwen3_next solar_open",
            "PEFT all-linear wraps MoE router/expert parameters the MoE block uses outside their module's forward"),
    **_both_full("bailing_hybrid inkling_text kimi_linear lfm2_moe lfm3",
                 "short convolution weight: fallback per-row sums do not add up"),
    **_both_full("longcat_flash", "MoE router classifier weight used outside its module's forward"),
    **_both_full("jetmoe", "mixture-of-attention experts: fallback per-row sums do not add up"),
    **_both_full("qwen4_exp_text", "hyper-connection norm: fallback per-row sums do not add up"),
    **_both_full("xlm", "embedding layer norm: fallback per-row sums do not add up"),
    **_both_full("reformer", "axial position embedding: fallback per-row sums do not add up"),
    **_both_full("deepseek_v4", "attention called with a dict argument that cannot be split per row"),
    **_both_full("gpt_neox_japanese", "attention called with a per-feature (d,) tensor argument"),
    **_both_full("hy_v3 minimax_m2", "MoE gate called with a per-expert tensor argument"),
    **_both_full("llama4_text dbrx", "token-routed experts called on a gathered (tokens x k, d) tensor"),
    **_both_full("zaya", "lm_head weight used outside its module's forward (untied: a hidden-state scale whose "
                         "fallback per-row sums do not add up)"),
    **_both_full("dory", "lm_head.logit_scale used outside its module's forward"),
    **_both_full("whisper", "positional embedding weight indexed outside its module's forward"),
    **_both_full("xlnet", "lm_loss weight used outside its module's forward"),
    **_lora("xlnet", "LoRA on a layer called with a (T, R, d) time-major tensor"),
    **_both_full("recurrent_gemma", "the RG-LRU keeps its recurrent state on the module: no per-row replay"),
    ("recurrent_gemma", FULL_GS, False): "the RG-LRU keeps its recurrent state on the module: no per-row replay",
}

# (model_type, variant) for the config's default tying, (model_type, variant, tie) for the flipped one -> what goes
# wrong today (strict xfail: an entry that starts passing must be removed, and
# an entry that becomes a clear refusal moves to REFUSED)
XFAIL: dict[tuple, str] = {}


def _cells():
    out = []
    for t in zoo.model_types():
        flip = [tie for tie in zoo.tie_variants(t) if tie is not None]
        for v in ALL:
            ties = [None] + (flip if v == FULL_GS else [])
            for tie in ties:
                marks = []
                why = XFAIL.get((t, v) if tie is None else (t, v, tie))
                if why is not None:
                    marks.append(pytest.mark.xfail(strict=True, reason=why))
                tid = f"{t}-{v}" + ("" if tie is None else ("-tied" if tie else "-untied"))
                out.append(pytest.param(t, v, tie, id=tid, marks=marks))
    return out


@pytest.mark.parametrize("model_type, variant, tie", _cells())
def test_exact_or_refused(model_type, variant, tie):
    _, lora, method, opts = next(v for v in zoo.VARIANTS if v[0] == variant)
    built = zoo.build(model_type, tie=tie, lora=lora)
    if built.model is None:
        pytest.skip(built.skip)
    refused = REFUSED.get((model_type, variant, tie), REFUSED.get((model_type, variant)))
    if refused is not None:
        err = zoo.refusal_error() or ValueError
        with pytest.raises(err) as info:
            zoo.check(built.model, method, **opts)
        assert zoo.is_refusal(info.value), info.value
        return
    res = zoo.check(built.model, method, **opts)
    assert res.exact, f"silently wrong ({built.mode} mode): {res.summary()}"


def test_refused_and_xfail_entries_name_real_cells():
    types = set(zoo.model_types())
    for key in list(REFUSED) + list(XFAIL):
        assert key[0] in types and key[1] in ALL, key
    assert not set(REFUSED) & set(XFAIL)


def test_oracle_rows_add_up_to_plain_backward():
    model = zoo.tiny_model("llama")
    b = zoo.batch(model)
    u, counts, _ = zoo.per_sample_grads(model, b)
    from drpost.objectives import causal_lm_loss

    model.zero_grad(set_to_none=True)
    loss, _ = causal_lm_loss(model, b)
    loss.sum().backward()
    for n, p in zoo.trainable(model).items():
        assert zoo.rel(u[n].sum(0), p.grad) < 1e-12, n
    model.zero_grad(set_to_none=True)
    assert counts.tolist() == (b["labels"][:, 1:] != -100).sum(1).tolist()


def test_check_catches_a_silently_wrong_gradient(monkeypatch):
    """The harness itself: a 1% error on one parameter's .grad, or a swapped subset, is not 'exact'."""
    import drpost

    model = zoo.tiny_model("gpt2")
    assert zoo.check(model, "global_subset", frac=0.5).exact
    step = drpost.DataRegularizer.step

    def skewed(self, *a, **k):
        rep = step(self, *a, **k)
        p = next(p for n, p in self.model.named_parameters() if n.endswith("ln_f.bias"))
        p.grad.mul_(1.01)
        return rep

    monkeypatch.setattr(drpost.DataRegularizer, "step", skewed)
    res = zoo.check(model, "global_subset", frac=0.5)
    assert not res.exact and res.worst_param.endswith("ln_f.bias"), res.summary()
