"""General-pool samplers (``drpost.trainers.samplers``): the guided distribution's draws follow ``probs()`` (chi-square,
fixed seed), every row stays reachable, its state survives a checkpoint round trip bit-identically, and with guidance
off the sampler is the uniform sampler of earlier releases (same draws, same training numbers)."""

import io
import random

import numpy as np
import pytest
import torch

from drpost.trainers.samplers import (
    GeneralSampler,
    Guidance,
    GuidedPool,
    guided_pool,
    text_features,
    token_features,
)
from drpost.trainers.sft import MethodSpec, SFTRecipe, train_sft
from tests.reliability.conftest import micro_dir  # noqa: F401  (fixture)


def _pool(N=40, dim=64, **opts) -> GuidedPool:
    texts = [f"word{i % 7} token{i % 5} shared" for i in range(N)]
    return guided_pool(Guidance(mode="guided", dim=dim, **opts), texts=texts)


def test_features_are_normalized_sparse_rows():
    X = text_features(["a b c", "a a", ""], 32)
    norms = np.sqrt(np.asarray(X.multiply(X).sum(1)).ravel())
    assert X.shape == (3, 32) and np.allclose(norms[:2], 1.0) and norms[2] == 0.0
    T = token_features([{"input_ids": [1, 2, 3, 2]}, [5, 5]], 16)
    assert T.shape == (2, 16) and np.allclose(np.asarray(T.multiply(T).sum(1)).ravel(), 1.0)


def test_draws_follow_the_distribution_chi_square():
    from scipy.stats import chisquare

    g = _pool(N=20, exploration=0.3, temperature=0.7)
    g.pred = np.linspace(-2.0, 2.0, 20)  # a fixed, strongly non-uniform distribution
    p = g.probs()
    assert p.sum() == pytest.approx(1.0) and p.max() / p.min() > 5
    draws = g.draw(random.Random(0), 40_000)
    counts = np.bincount(draws, minlength=20)
    assert chisquare(counts, 40_000 * p).pvalue > 1e-3


def test_exploration_keeps_every_row_reachable():
    N, eps = 30, 0.3
    g = _pool(N=N, exploration=eps, temperature=0.05)
    rng = np.random.default_rng(0)
    for _ in range(40):  # strong evidence that rows 0..4 are the only good ones
        idx = list(rng.integers(0, N, 8))
        g.update(idx, np.array([10.0 if i < 5 else -10.0 for i in idx]), np.ones(8))
    p = g.probs()
    assert p.min() >= eps / N * (1 - 1e-12)
    assert set(g.draw(random.Random(1), 3000)) == set(range(N))


def test_the_predictor_learns_which_rows_align():
    g = _pool(N=60, dim=128)
    rng = np.random.default_rng(0)
    good = {i for i in range(60) if i % 7 == 3}  # rows with word3: one feature carries the signal
    for _ in range(60):
        idx = list(rng.integers(0, 60, 8))
        g.update(idx, np.array([1.0 if i in good else 0.0 for i in idx]) + 0.1 * rng.standard_normal(8), np.ones(8))
    p = g.probs()
    assert p[sorted(good)].mean() > 2 * p[[i for i in range(60) if i not in good]].mean()


def test_resume_restores_the_sampler_bit_identically():
    def run(steps, g, rng, seed):
        r = np.random.default_rng(seed)
        out = []
        for _ in range(steps):
            idx = g.draw(rng, 8)
            out += idx
            g.update(idx, r.standard_normal(8), r.integers(1, 30, 8).astype(float))
        return out

    a, rng_a = _pool(refresh=2), random.Random(5)
    first = run(5, a, rng_a, 0)
    buf = io.BytesIO()  # the checkpoint path: plain tensors and containers, weights_only load
    torch.save({"guide": a.state_dict(), "rng": rng_a.getstate()}, buf)
    straight = run(7, a, rng_a, 1)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b = _pool(refresh=2)
    b.load_state_dict(saved["guide"])
    rng_b = random.Random()
    rng_b.setstate(tuple(tuple(x) if isinstance(x, (list, tuple)) else x for x in saved["rng"]))
    assert first and run(7, b, rng_b, 1) == straight
    assert np.array_equal(a.w, b.w) and np.array_equal(a.A, b.A) and np.array_equal(a.pred, b.pred)
    with pytest.raises(ValueError, match="sampler options"):
        _pool(refresh=3).load_state_dict(saved["guide"])


def test_the_sft_task_checkpoints_the_sampler_state():
    from drpost.trainers.sft import LoopParts, SFTTask

    g = _pool()
    sampler = GeneralSampler(MethodSpec("m"), 40, 2, 4, random.Random(0), guide=g)
    parts = LoopParts(None, None, None, None, [], sampler, [], [], [], None, 0, 1, None)
    g.update([1, 2], np.array([1.0, -1.0]), np.ones(2))
    state = SFTTask(parts, sampler.rng).state_dict()
    assert torch.equal(state["sampler"]["guide"]["w"], torch.from_numpy(g.w))


class _LegacySampler:
    """The uniform sampler of earlier releases, verbatim (the reference of guidance off)."""

    def __init__(self, spec, n_pool, n_target, n, rng, selected=None, guide=None):
        self.spec, self.n_pool, self.n_target, self.n, self.rng = spec, n_pool, n_target, n, rng
        self.selected, self.guide, self.seconds = selected, None, 0.0

    def draw(self):
        kind, rng, n = self.spec.sampler, self.rng, self.n
        if kind == "pool":
            return [("g", rng.randrange(self.n_pool)) for _ in range(n)]
        if kind == "candidates":
            return [("g", rng.randrange(self.n_pool)) for _ in range(2 * n)]
        if kind == "selected":
            return [("g", self.selected[rng.randrange(len(self.selected))]) for _ in range(n)]
        if kind == "random_subset":
            keep = max(1, int(float(self.spec.sampler_options.get("frac", 0.5)) * n + 0.5))
            return [("g", rng.randrange(self.n_pool)) for _ in range(n)][:keep]
        if kind == "mixing":
            p = float(self.spec.sampler_options.get("target_prob", 0.1))
            return [("t", rng.randrange(self.n_target)) if rng.random() < p else ("g", rng.randrange(self.n_pool))
                    for _ in range(n)]
        raise ValueError(kind)

    def update(self, draw, report):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.parametrize("kind, opts", [("pool", {}), ("candidates", {}), ("selected", {}),
                                        ("random_subset", {"frac": 0.5}), ("mixing", {"target_prob": 0.3})])
def test_guidance_off_draws_exactly_as_the_uniform_sampler(kind, opts):
    spec = MethodSpec("m", sampler=kind, sampler_options=opts)
    new = GeneralSampler(spec, 100, 4, 8, random.Random(3), selected=[5, 9, 11])
    old = _LegacySampler(spec, 100, 4, 8, random.Random(3), selected=[5, 9, 11])
    assert [new.draw() for _ in range(20)] == [old.draw() for _ in range(20)]


def test_candidate_batches_from_the_selected_rows():
    spec = MethodSpec("m", sampler="selected", sampler_options={"select_frac": 0.1, "candidates": 2})
    draws = [GeneralSampler(spec, 100, 4, 8, random.Random(3), selected=[5, 9, 11]).draw() for _ in range(5)]
    assert all(len(d) == 16 and {i for _, i in d} <= {5, 9, 11} for d in draws)
    # candidates=1 is the plain sampler: the same draws as before the option existed
    plain = MethodSpec("m", sampler="selected", sampler_options={"candidates": 1})
    old = _LegacySampler(plain, 100, 4, 8, random.Random(3), selected=[5, 9, 11])
    assert GeneralSampler(plain, 100, 4, 8, random.Random(3), selected=[5, 9, 11]).draw() == old.draw()
    for bad, kind in ((0, "pool"), (1.5, "pool"), (True, "pool"), (2, "mixing")):
        with pytest.raises(ValueError, match="'candidates'"):
            GeneralSampler(MethodSpec("m", sampler=kind, sampler_options={"candidates": bad}), 100, 4, 8,
                           random.Random(0))


@pytest.fixture(scope="module")
def micro_world():
    from drpost.world.arch import build_model
    from drpost.world.tasks import generate_examples
    from drpost.world.tokenizer import build_tokenizer

    pool = generate_examples(60, ["reverse", "add", "upper"], ["qa", "inst"], seed="sampler-pool")
    target = generate_examples(4, ["reverse"], ["qa"], seed="sampler-target")
    return build_tokenizer(), lambda: build_model("micro", seed=0), pool, target


def test_guidance_off_trains_the_same_numbers_as_the_uniform_sampler(micro_world, monkeypatch):
    import drpost.trainers.sft as sft

    tok, model, pool, target = micro_world
    recipe = SFTRecipe(steps=4, general_batch_size=4)
    spec = MethodSpec("m", "layerwise_subset", {"frac": 0.5}, guidance={"mode": "uniform"})
    new = train_sft(model(), tok, pool, target, spec, recipe)
    monkeypatch.setattr(sft, "GeneralSampler", _LegacySampler)
    old = train_sft(model(), tok, pool, target, spec, recipe)
    assert new["train_loss"] == old["train_loss"] and new["target_loss"] == old["target_loss"]
    for (n1, p1), (n2, p2) in zip(new["model"].named_parameters(), old["model"].named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_guided_training_runs_and_learns_from_scores(micro_world):
    tok, model, pool, target = micro_world
    spec = MethodSpec("m", "full_training", guidance={"mode": "guided", "dim": 64})
    out = train_sft(model(), tok, pool, target, spec, SFTRecipe(steps=3, general_batch_size=4))
    assert len(out["train_loss"]) == 3 and out["sampler_seconds"] > 0


def test_trl_sft_trainer_takes_the_guided_sampler_and_the_dsir_prefilter(tmp_path):
    pytest.importorskip("trl")
    from trl import SFTConfig

    from drpost.integrations.trl import DrSFTTrainer
    from drpost.world.tokenizer import build_tokenizer
    from tests.integrations.test_trl import COMMON, tiny
    from tests.integrations.trl_data import sft_data

    tok = build_tokenizer()
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=0.1,
                     **COMMON)
    tr = DrSFTTrainer(model=tiny(tok), args=args, train_dataset=sft_data(16), processing_class=tok,
                      target_dataset=sft_data(2, off=30), dr_method="full_training",
                      dr_sampler={"mode": "guided", "dim": 32}, dr_prefilter="dsir", dr_prefilter_frac=0.5)
    assert len(tr.train_dataset) == 8 and tr.dr_sampler is not None
    assert tr._get_train_sampler() is tr.dr_sampler
    tr.train()
    assert tr.dr_sampler.guide.updates == 3  # one update per step, from the step's scores
    assert not tr.dr_sampler.pending or len(tr.dr_sampler.pending) < 16


def test_composed_bench_methods_name_both_parts_and_train():
    from drpost.bench import quality
    from drpost.bench.quality_methods import COMPOSED, prefilter_of
    from tests.bench.test_quality import tiny_setting

    assert {"guided_layerwise_subset", "guided_global_subset", "guided_hull", "dsir_prefilter_layerwise_subset",
            "dsir_prefilter_hull"} <= COMPOSED <= quality.DR_METHODS
    assert prefilter_of("dsir_prefilter_hull") == "dsir" and prefilter_of("guided_hull") is None
    ctx: dict = {}
    assert prefilter_of("less_prefilter_layerwise_subset_2n") == "less"
    for name, knob in (("guided_layerwise_subset", 0.5), ("dsir_prefilter_hull", 0.25),
                       ("dsir_prefilter_layerwise_subset_2n", 0.25)):
        r = quality.run_one(tiny_setting(), name, knob, 0, SFTRecipe(steps=2), n_val=2, _ctx=ctx)
        assert r["method"] == name and r["skipped_steps"] == 0 and "retention_em" in r
        assert r["sampler_ms_per_step"] >= 0 and r["step_ms"] > 0


def test_pareto_front():
    from drpost.bench.quality_report import pareto_front

    row = lambda t, r: {"target_em": (t, 0.0), "retention_em": (r, 0.0)}  # noqa: E731
    by = {"a": row(0.2, 0.1), "b": row(0.1, 0.3), "c": row(0.1, 0.1), "d": row(0.15, 0.3), "e": row(0.2, 0.1)}
    assert sorted(pareto_front(by)) == ["a", "d", "e"]  # c and b are dominated; ties (a, e) both stay


def test_drpost_sft_guided_resume_equals_uninterrupted(tmp_path, capsys, one_thread, micro_dir):  # noqa: F811
    """``drpost sft sampler.mode=guided`` (with a DSIR prefilter): the guide's state is in the checkpoint, so a run
    resumed mid-way equals the uninterrupted one (metrics, final weights)."""
    import shutil

    from drpost.trainers import checkpoint as ckpt
    from tests.reliability.conftest import SMALL, run_sft
    from tests.reliability.test_resume import _assert_same_run

    argv = [f"model.name_or_path={micro_dir}", *SMALL, "save_every=3", "regularizer.method=global_subset",
            "sampler.mode=guided", "sampler.dim=64", "sampler.refresh=2", "sampler.prefilter=dsir",
            "sampler.prefilter_frac=0.5"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_sft([f"output_dir={a}", *argv], capsys)[0] == 0
    state = torch.load(a / "checkpoints" / ckpt.step_dir_name(3) / ckpt.STATE, weights_only=True)
    assert state["task"]["sampler"]["guide"]["updates"] == 3  # the guide really is part of the state
    shutil.copytree(a / "checkpoints" / ckpt.step_dir_name(3), b / "checkpoints" / ckpt.step_dir_name(3))
    assert run_sft([f"output_dir={b}", *argv, "resume=auto"], capsys)[0] == 0
    _assert_same_run(a, b)


def test_drpost_sft_candidates_draws_a_candidate_batch_from_the_kept_rows(tmp_path, capsys, one_thread,
                                                                         micro_dir, monkeypatch):  # noqa: F811
    """``sampler.candidates=2`` with a DSIR prefilter: each step's general batch is 2n rows, all of them kept rows."""
    import drpost.trainers.sft as sft
    from tests.reliability.conftest import SMALL, run_sft

    seen: list = []

    class Recording(sft.GeneralSampler):
        def draw(self):
            d = super().draw()
            seen.append((len(d), {i for _, i in d} <= set(self.selected)))
            return d

    monkeypatch.setattr(sft, "GeneralSampler", Recording)
    argv = [f"model.name_or_path={micro_dir}", *SMALL, "regularizer.method=layerwise_subset", "regularizer.frac=0.5",
            "sampler.prefilter=dsir", "sampler.prefilter_frac=0.25", "sampler.candidates=2"]
    assert run_sft([f"output_dir={tmp_path / 'a'}", *argv], capsys)[0] == 0
    assert seen == [(8, True)] * 6  # general_batch_size=4: 8 candidates a step
    code, err = run_sft([f"output_dir={tmp_path / 'b'}", *argv[:-1], "sampler.candidates=0"], capsys)
    assert code != 0 and "sampler.candidates" in err


def test_drpost_sft_less_prefilter_keeps_the_top_less_rows(tmp_path, capsys, one_thread, micro_dir,  # noqa: F811
                                                          monkeypatch):
    """``sampler.prefilter=less``: LESS scores the *base* model (no adapters yet) on the run's pool and targets,
    and the run's sampler draws only from the top ``prefilter_frac`` of them; a resumed run selects the same rows."""
    from drpost.baselines import less
    from drpost.trainers import sft
    from tests.reliability.conftest import SMALL, run_sft

    calls, kept = [], []
    real_scores, real_sampler = less.less_scores, sft.GeneralSampler

    def scores(base, tok, pool, target, **kw):
        assert not hasattr(base, "peft_config")  # the base model, before model.finetuning=lora wraps it
        calls.append((len(pool), len(target), kw))
        out = real_scores(base, tok, pool, target, **kw)
        calls[-1] += (out,)
        return out

    def sampler(spec, n_general, *a):
        kept.append(a[3])  # (spec, n_general, n_target, batch, rng, selected, guide): the selected rows
        return real_sampler(spec, n_general, *a)

    monkeypatch.setattr(less, "less_scores", scores)
    monkeypatch.setattr(sft, "GeneralSampler", sampler)
    argv = [f"model.name_or_path={micro_dir}", *SMALL, "model.finetuning=lora", "regularizer.method=hull",
            "sampler.prefilter=less", "sampler.prefilter_frac=0.25", f"output_dir={tmp_path / 'a'}"]
    assert run_sft(argv, capsys)[0] == 0
    n_pool, _, kw, s = calls[0]
    assert n_pool == 32 and kw["seed"] == 0 and s.shape == (32,) and torch.isfinite(s).all()
    assert kept[0] == sorted(torch.topk(s, 8).indices.tolist())  # the top 25% of the LESS scores


def test_trl_sft_trainer_less_prefilter(tmp_path):
    """``DrSFTTrainer(dr_prefilter="less")``: ``train_dataset`` keeps the top LESS rows, scored on the trainer's
    own tokenized rows (loss on the completion), and training runs on them."""
    pytest.importorskip("trl")
    from trl import SFTConfig

    from drpost.baselines.less import less_scores, less_select
    from drpost.integrations.trl import DrSFTTrainer
    from drpost.trainers.samplers import _trl_rows
    from drpost.world.tokenizer import build_tokenizer
    from tests.integrations.test_trl import COMMON, tiny
    from tests.integrations.trl_data import sft_data

    tok = build_tokenizer()
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=0.1,
                     **COMMON)
    model = tiny(tok)
    tr = DrSFTTrainer(model=model, args=args, train_dataset=sft_data(16), processing_class=tok,
                      target_dataset=sft_data(2, off=30), dr_method="layerwise_subset", dr_prefilter="less",
                      dr_prefilter_frac=0.25)
    assert len(tr.train_dataset) == 4
    ref = DrSFTTrainer(model=tiny(tok), args=args, train_dataset=sft_data(16), processing_class=tok,
                       target_dataset=sft_data(2, off=30), dr_method="layerwise_subset")
    rows = _trl_rows(ref, ref.train_dataset)
    assert any(t == -100 for t in rows[0]["labels"]) and any(t != -100 for t in rows[0]["labels"])  # prompt masked
    fresh = tiny(tok)  # the same weights, without the trainer's capture fitted to its modules
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ref.model.state_dict().values()))
    keep = sorted(less_select(less_scores(fresh, tok, rows, _trl_rows(ref, ref.target_dataset), seed=args.seed),
                              0.25))
    assert tr.train_dataset["input_ids"] == ref.train_dataset.select(keep)["input_ids"]
    tr.train()
    with pytest.raises(ValueError, match="dr_prefilter"):
        DrSFTTrainer(model=tiny(tok), args=args, train_dataset=sft_data(4), processing_class=tok,
                     target_dataset=sft_data(2, off=30), dr_prefilter="lesss")
