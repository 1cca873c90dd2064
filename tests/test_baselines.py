"""Baselines: DSIR importance weights by hand and its seeded selection; LESS (``baselines/less.py``) on a micro
model and a 40-example pool: scores are deterministic in the seed, pool copies of the targets score higher on
average, and ``less_select`` keeps the top fraction."""

import math

import pytest

from drpost.baselines.dsir import dsir_log_weights, dsir_select


def ex(text):
    return {"prompt": text, "completion": ""}


def test_dsir_log_weight_matches_hand_computation():
    pool = [ex("a b"), ex("c")]
    target = [ex("a")]
    B = 10_000
    w = dsir_log_weights(pool, target, buckets=B, smoothing=1.0)  # smoothing on: every bucket is finite
    # pool grams: a, b, "a b", c -> 4 tokens in 4 buckets (distinct hashes here); target: a (+1 smoothing everywhere)
    p_raw = 1 / 4
    p_a = 2 / (1 + B)
    p_other = 1 / (1 + B)
    expected0 = (math.log(p_a) - math.log(p_raw)) + 2 * (math.log(p_other) - math.log(p_raw))
    expected1 = math.log(p_other) - math.log(p_raw)
    assert w[0] == pytest.approx(expected0) and w[1] == pytest.approx(expected1)


def test_dsir_select_prefers_target_like_examples_and_is_seeded():
    pool = [ex(f"sort these letters {i}") for i in range(50)] + [ex(f"add {i} and {i}") for i in range(50)]
    target = [ex("sort these letters")] * 4
    sel = dsir_select(pool, target, 20, seed=0)
    assert sel == dsir_select(pool, target, 20, seed=0) and len(set(sel)) == 20
    assert sum(i < 50 for i in sel) >= 18


@pytest.fixture(scope="module")
def micro_less():
    import torch

    from drpost.trainers.sft import encode_examples
    from drpost.world.arch import build_model
    from drpost.world.tasks import generate_examples
    from drpost.world.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model("micro", seed=0)
    targets = generate_examples(4, ["reverse"], ["qa"], seed="less-target")
    others = generate_examples(36, ["add", "upper", "count_char"], ["inst"], seed="less-pool")
    pool = targets + others  # pool rows 0..3 are the target examples themselves
    t_rows = encode_examples(tok, targets, 96)
    p_rows = encode_examples(tok, pool, 96)
    return model, tok, p_rows, t_rows


def test_less_scores_are_seeded_and_find_the_target_examples(micro_less):
    import torch

    from drpost.baselines.less import less_scores, less_select

    model, tok, p_rows, t_rows = micro_less
    kw = dict(warmup_frac=0.2, epochs=1, batch_size=4, seed=3)  # exact cosine (proj_dim None)
    a = less_scores(model, tok, p_rows, t_rows, **kw)
    b = less_scores(model, tok, p_rows, t_rows, **kw)
    assert a.shape == (len(p_rows),) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert a[:4].mean() > a[4:].mean()  # copies of the targets score higher on average (random micro model)
    assert len(less_select(a, 0.1)) == 4  # round(0.1 * 40)
    assert not torch.equal(a, less_scores(model, tok, p_rows, t_rows, **{**kw, "seed": 4}))


def test_less_select_keeps_the_top_fraction():
    import torch

    from drpost.baselines.less import less_select

    scores = torch.tensor([0.1, 0.9, -0.3, 0.5, 0.7])
    assert less_select(scores, 0.4) == [1, 4] and less_select(scores, 0.01) == [1]


# ------------------------------------------------------------------------------------------- LESS feature modes
@pytest.fixture(scope="module")
def lora_f64(micro_less):
    """A float64 LoRA micro model with random adapters and random positive Adam moments (one fake checkpoint)."""
    import copy

    import torch

    from drpost.geometry.capture import Capture
    from drpost.trainers.sft import SFTRecipe, prepare_model

    model, tok, p_rows, t_rows = micro_less
    torch.manual_seed(1)
    lm = prepare_model(copy.deepcopy(model).double(),
                       SFTRecipe(finetuning="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0))
    lm.eval()
    params = [p for p in lm.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    m = [torch.randn_like(p) * 1e-3 for p in params]
    v = [torch.rand_like(p) * 1e-5 for p in params]
    return lm, Capture(lm), params, m, v, p_rows[:12], t_rows, tok.pad_token_id or 0


def _brute_force_cosines(lm, params, m, v, pool, target, pad):
    """mean_j cos(adam(grad_i), grad_j) from per-example autograd, one row at a time (fp64)."""
    import torch

    from drpost.baselines.greats import sample_mean_loss
    from drpost.data.collate import collate

    def grad(row):
        loss, _ = sample_mean_loss(lm, collate([row], pad))
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss.sum(), params)])

    mm, vv = torch.cat([x.reshape(-1) for x in m]), torch.cat([x.reshape(-1) for x in v])
    tg = torch.nn.functional.normalize(torch.stack([grad(r) for r in target]), dim=1)
    out = []
    for r in pool:
        g = grad(r)
        a = (0.9 * mm + 0.1 * g) / torch.sqrt(0.999 * vv + 0.001 * g**2 + 1e-8)
        out.append((torch.nn.functional.normalize(a, dim=0) @ tg.t()).mean())
    return torch.stack(out)


def test_less_exact_cosine_matches_brute_force_fp64(lora_f64):
    import torch

    from drpost.baselines.less import checkpoint_cosines

    lm, cap, params, m, v, pool, target, pad = lora_f64
    got = checkpoint_cosines(lm, cap, params, m, v, pool, target, pad, score_batch=5)  # 3 pool batches
    ref = _brute_force_cosines(lm, params, m, v, pool, target, pad)
    # 1e-6: transformers keeps attention softmax / RMSNorm statistics in float32 in a float64 model (README)
    assert got.shape == (12,) and torch.allclose(got, ref, rtol=1e-6, atol=1e-8)


def test_less_count_sketch_approximates_the_exact_cosine(lora_f64):
    import torch

    from drpost.baselines.less import CountSketch, checkpoint_cosines

    lm, cap, params, m, v, pool, target, pad = lora_f64
    exact = checkpoint_cosines(lm, cap, params, m, v, pool, target, pad)
    P = sum(p.numel() for p in params)
    sk = CountSketch(P, 8192, seed=0)
    approx = checkpoint_cosines(lm, cap, params, m, v, pool, target, pad, sketch=sk)
    assert sk.bucket.shape == (P,)  # O(P) state, never a dense P x k matrix
    assert (approx - exact).abs().max() < 0.1
    assert torch.corrcoef(torch.stack([approx, exact]))[0, 1] > 0.9


def test_less_cosines_follow_the_pool_rows_whatever_their_order(lora_f64):
    import torch

    from drpost.baselines.less import checkpoint_cosines

    lm, cap, params, m, v, pool, target, pad = lora_f64
    assert len({len(r["input_ids"]) for r in pool}) > 2  # rows of several lengths: batching reorders them
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0)).tolist()
    a = checkpoint_cosines(lm, cap, params, m, v, pool, target, pad, score_batch=4)
    b = checkpoint_cosines(lm, cap, params, m, v, [pool[i] for i in perm], target, pad, score_batch=4)
    assert torch.allclose(b, a[perm], rtol=1e-9, atol=1e-12)


def test_count_sketch_by_parts_equals_the_whole_vector():
    import torch

    from drpost.baselines.less import CountSketch

    g = torch.randn(3, 1000, dtype=torch.float64)
    sk = CountSketch(1000, 64, seed=2)
    acc = torch.zeros(3, 64, dtype=torch.float64)
    for lo, hi in ((0, 10), (10, 400), (400, 1000)):
        sk.add_(acc, g[:, lo:hi], lo)
    assert torch.allclose(acc, sk(g), rtol=1e-12, atol=1e-12)


def test_less_store_resumes_at_the_missing_checkpoint(micro_less, tmp_path, monkeypatch):
    import json

    import torch

    from drpost.baselines import less

    model, tok, p_rows, t_rows = micro_less
    kw = dict(warmup_frac=0.2, epochs=3, batch_size=4, seed=3)
    calls = {"cosines": 0, "warmup": 0}
    real_cos, real_warmup = less.checkpoint_cosines, less._warmup

    def counting_cos(*a, **k):
        calls["cosines"] += 1
        return real_cos(*a, **k)

    def counting_warmup(*a, **k):
        calls["warmup"] += 1
        return real_warmup(*a, **k)

    monkeypatch.setattr(less, "checkpoint_cosines", counting_cos)
    monkeypatch.setattr(less, "_warmup", counting_warmup)
    store = less.CheckpointStore(tmp_path, "pool")
    ref = less.less_scores(model, tok, p_rows, t_rows, **kw, store=store)
    assert calls == {"cosines": 3, "warmup": 1} and sorted(p.name for p in tmp_path.iterdir()) == [
        "pool__ck0.json", "pool__ck1.json", "pool__ck2.json"]
    assert store.seconds() > 0
    assert torch.allclose(ref, less.less_scores(model, tok, p_rows, t_rows, **kw), rtol=1e-6)  # same as no store

    (tmp_path / "pool__ck1.json").unlink()  # interrupted while scoring checkpoint 1
    assert store.seconds() is None
    tampered = json.loads((tmp_path / "pool__ck2.json").read_text())
    tampered["fingerprint"] *= 1.01  # a file from another warm-up is not used
    (tmp_path / "pool__ck2.json").write_text(json.dumps(tampered))
    calls.update(cosines=0, warmup=0)
    again = less.less_scores(model, tok, p_rows, t_rows, **kw, store=less.CheckpointStore(tmp_path, "pool"))
    assert calls == {"cosines": 2, "warmup": 1} and torch.allclose(again, ref, rtol=1e-6)

    calls.update(cosines=0, warmup=0)  # every checkpoint on disk: no warm-up, no scoring
    done = less.less_scores(model, tok, p_rows, t_rows, **kw, store=less.CheckpointStore(tmp_path, "pool"))
    assert calls == {"cosines": 0, "warmup": 0} and torch.allclose(done, ref, rtol=1e-6)
    calls.update(cosines=0, warmup=0)  # other settings (here the seed) never reuse the files
    less.less_scores(model, tok, p_rows, t_rows, **{**kw, "seed": 4}, store=less.CheckpointStore(tmp_path, "pool"))
    assert calls == {"cosines": 3, "warmup": 1}


def test_count_sketch_preserves_inner_products_on_average():
    import torch

    from drpost.baselines.less import CountSketch

    x, y = torch.randn(2, 5000, dtype=torch.float64)
    est = torch.stack([(CountSketch(5000, 256, s)(x[None]) * CountSketch(5000, 256, s)(y[None])).sum()
                       for s in range(200)])
    assert abs(float(est.mean()) - float(x @ y)) < 4 * float(est.std()) / 200**0.5 + 1e-9


# ------------------------------------------------------------------------------------------------- GREATS update
def test_greats_trains_on_the_token_mean_of_the_kept_rows(micro_less):
    import copy

    import torch

    from drpost.baselines.greats import greats_step, sample_mean_loss
    from drpost.data.collate import collate
    from drpost.objectives.sft import causal_lm_loss
    from drpost.step import DataRegularizer

    model, tok, p_rows, t_rows = micro_less
    lm = copy.deepcopy(model).double()
    pad = tok.pad_token_id or 0
    general, target = collate(p_rows[4:12], pad), collate(t_rows[:2], pad)
    reg = DataRegularizer(lm, method="global_subset", selection="greedy", frac=0.5)
    c, _ = DataRegularizer(lm, method="global_subset", selection="greedy", frac=0.5).row_weights(
        general, target, sample_mean_loss, lr=1e-3)
    kept = torch.nonzero(c[:8] != 0).flatten()  # the official selection rule on per-sample mean losses
    lm.zero_grad(set_to_none=True)
    rep = greats_step(reg, lm, general, target, lr=1e-3)
    got = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad(set_to_none=True)
    sums, counts = causal_lm_loss(lm, {k: v[kept] for k, v in general.items()})
    (sums.sum() / counts.sum()).backward()  # token mean over the kept batch
    for n, p in lm.named_parameters():
        assert torch.allclose(got[n], p.grad, rtol=1e-9, atol=1e-12), n
    assert torch.equal(torch.nonzero(rep.weights[0]).flatten(), kept)
    assert float((rep.weights[0] * rep.counts).sum()) == pytest.approx(1.0)
