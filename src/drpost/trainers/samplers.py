"""General-pool samplers: which pool rows form each step's general batch.

Owns ``GeneralSampler`` (the SFT loop's batch sampler: plain pool, GREATS candidates, an offline-selected pool,
mixing, random subsets), ``Guidance`` (the options of a score-guided pool distribution), ``GuidedPool`` (that
distribution: an online predictor of each row's alignment with the target gradient) and the hashed n-gram features
it predicts from (``text_features``, ``token_features``). ``GuidedTorchSampler`` serves the same distribution to a
``torch.utils.data.DataLoader`` (the TRL adapter).

Guided sampling. Every regularized step already computes, for each general sample i it sees, the alignment score
``s_i = <u_i, g_T>`` (``StepReport.scores``; ``u_i`` the gradient of the sample's summed loss, ``g_T`` the token-mean
target gradient). ``GuidedPool`` turns those scores into a distribution over the whole pool:

* features: ``x_r`` in R^D, hashed unigrams + bigrams of row r (words of its text, or its token ids), L2-normalized;
  a sparse (N, D) matrix built once;
* target: ``y_i = (s_i / N_i - mu) / sigma``, the per-token score standardized by running (exponentially weighted,
  factor ``decay`` per step) estimates of its mean and standard deviation, so the scale of ``g_T`` may drift;
* predictor: exponentially weighted ridge regression, ``A <- decay A + X_b^T X_b``, ``b <- decay b + X_b^T y``,
  ``w = argmin ||X w - y||^2_decay + ridge ||w||^2``, solved by ``cg_iters`` conjugate-gradient iterations on
  ``(A + ridge I) w = b`` warm-started from the previous ``w`` (the forgetting keeps it following ``g_T`` as training
  moves it);
* distribution: ``pred = X w`` (refreshed every ``refresh`` steps),
  ``p_r = (1 - eps) softmax(pred / (temperature * std(pred)))_r + eps / N``: every row keeps probability at least
  ``eps / N`` (exploration: nothing becomes unreachable), and rows with the same features share mass (no collapse
  onto a few rows). Rows are drawn i.i.d. with replacement, one ``rng.random()`` per slot (inverse CDF).

Guidance off (``Guidance(mode="uniform")``, the default) is exactly the uniform sampler of earlier releases: the same
``rng.randrange`` calls in the same order, so the same runs give the same numbers.
"""

from __future__ import annotations

import random
import re
import time
import zlib
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
import torch

GUIDANCE_MODES = ("uniform", "guided")
_TOKEN = re.compile(r"\w+|[^\w\s]")  # DSIR's word / punctuation tokens (drpost.baselines.dsir)


@dataclass
class Guidance:
    """Options of the general-pool distribution (``mode="uniform"``: every row equally likely, as before)."""

    mode: str = "uniform"  # uniform | guided
    exploration: float = 0.2  # eps: weight of the uniform floor; every row has probability >= eps / N
    temperature: float = 1.0  # softmax temperature in units of the predictions' standard deviation
    dim: int = 512  # D, hashed feature dimension (1024: ~4x the update cost, measured)
    ridge: float = 1.0  # ridge penalty of the predictor
    decay: float = 0.98  # forgetting factor per step of the predictor's statistics and of the score scale
    refresh: int = 1  # recompute the pool's predictions every this many steps
    cg_iters: int = 8  # conjugate-gradient iterations per update
    features: str = "auto"  # auto (text when the rows have it, else token ids) | text | tokens

    def __post_init__(self):
        if self.mode not in GUIDANCE_MODES:
            raise ValueError(f"option 'mode' must be one of {GUIDANCE_MODES}, got {self.mode!r}")
        if not 0.0 <= self.exploration <= 1.0:
            raise ValueError(f"option 'exploration' must be in [0, 1], got {self.exploration!r}")
        if self.mode == "guided" and self.exploration <= 0.0:
            raise ValueError("option 'exploration' must be > 0 with guided sampling (every row stays reachable)")
        if self.temperature <= 0 or self.ridge <= 0 or not 0 < self.decay <= 1:
            raise ValueError("options 'temperature' and 'ridge' must be > 0 and 'decay' in (0, 1]")
        if min(self.dim, self.refresh, self.cg_iters) < 1:
            raise ValueError("options 'dim', 'refresh' and 'cg_iters' must be >= 1")
        if self.features not in ("auto", "text", "tokens"):
            raise ValueError(f"option 'features' must be auto, text or tokens, got {self.features!r}")

    @classmethod
    def of(cls, g) -> Guidance:
        """A ``Guidance`` from None (uniform), a mode name, a dict of options or a ``Guidance``."""
        if g is None:
            return cls()
        if isinstance(g, Guidance):
            return g
        if isinstance(g, str):
            return cls(mode=g)
        return cls(**g)

    @property
    def on(self) -> bool:
        return self.mode == "guided"


# ------------------------------------------------------------------------------------------------------- features
def _csr(ids: list[np.ndarray], dim: int) -> sp.csr_matrix:
    """(N, dim) float64 CSR of bucket counts (ids with repeats), rows L2-normalized."""
    indptr = np.cumsum([0] + [len(i) for i in ids])
    cols = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    X = sp.csr_matrix((np.ones(len(cols)), cols, indptr), shape=(len(ids), dim))
    X.sum_duplicates()
    norms = np.sqrt(np.asarray(X.multiply(X).sum(1)).ravel())
    return sp.diags(1.0 / np.maximum(norms, 1e-12)) @ X


def text_features(texts: list[str], dim: int) -> sp.csr_matrix:
    """(N, dim) hashed word unigrams + bigrams (DSIR's tokens and crc32 hash), rows L2-normalized."""
    ids = []
    for t in texts:
        toks = _TOKEN.findall(t.lower())
        grams = toks + [a + " " + b for a, b in zip(toks, toks[1:])]
        ids.append(np.array([zlib.crc32(g.encode()) % dim for g in grams], dtype=np.int64))
    return _csr(ids, dim)


def token_features(rows: list, dim: int) -> sp.csr_matrix:
    """(N, dim) hashed token-id unigrams + bigrams of each row's ``input_ids`` (or id list), rows L2-normalized."""
    ids = []
    for r in rows:
        a = np.asarray(r["input_ids"] if isinstance(r, dict) else r, dtype=np.int64)
        bi = a[:-1] * 1_000_003 + a[1:] + 7_919  # (T-1,) bigram codes, disjoint in practice from unigram ids
        ids.append(np.concatenate([a, (bi * 2_654_435_761) % 4_294_967_291]) % dim)
    return _csr(ids, dim)


# ------------------------------------------------------------------------------------------------- the guided pool
class GuidedPool:
    """A distribution over candidate pool rows, learned online from the steps' alignment scores (module docstring).

    ``X``: (N, D) sparse features of the candidates; ``rows``: (N,) pool index of each candidate (None: 0..N-1).
    """

    def __init__(self, X: sp.csr_matrix, opts: Guidance, rows: list[int] | None = None):
        self.X, self.opts = X.tocsr(), opts
        self.N, D = X.shape
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)  # (N,)
        self.pos = None if rows is None else {int(r): i for i, r in enumerate(self.rows)}  # pool index -> candidate
        self.A = np.zeros((D, D))  # (D, D) weighted X_b^T X_b
        self.b = np.zeros(D)  # (D,) weighted X_b^T y
        self.w = np.zeros(D)  # (D,) ridge weights
        self.mu, self.var, self.mass = 0.0, 0.0, 0.0  # running score mean, variance and total weight
        self.updates = 0
        self.pred = np.zeros(self.N)  # (N,) predictions the current distribution was made from
        self._cdf: np.ndarray | None = None  # (N,) cumulative probabilities (rebuilt after a refresh)

    # -------------------------------------------------------------- drawing
    def probs(self) -> np.ndarray:
        """(N,) p_r = (1 - eps) softmax(pred / (temperature std(pred))) + eps / N."""
        eps, sd = self.opts.exploration, float(self.pred.std())
        if sd <= 0:
            return np.full(self.N, 1.0 / self.N)
        z = self.pred / (self.opts.temperature * sd)
        e = np.exp(z - z.max())
        return (1 - eps) * e / e.sum() + eps / self.N

    def draw(self, rng: random.Random, k: int) -> list[int]:
        """k pool indices drawn i.i.d. from ``probs()``: one ``rng.random()`` each (inverse CDF)."""
        if self._cdf is None:
            self._cdf = np.cumsum(self.probs())
        u = np.array([rng.random() for _ in range(k)]) * self._cdf[-1]
        idx = np.minimum(np.searchsorted(self._cdf, u, side="right"), self.N - 1)
        return (idx if self.rows is None else self.rows[idx]).tolist()

    # -------------------------------------------------------------- learning
    def update(self, pool_idx: list[int], scores, counts) -> None:
        """One step's evidence: pool rows ``pool_idx`` (n,), their scores <u_i, g_T> (n,) and loss tokens (n,)."""
        keep = [j for j, i in enumerate(pool_idx) if self.pos is None or i in self.pos]
        if not keep:
            return
        s = np.asarray(scores, dtype=np.float64)[keep] / np.maximum(np.asarray(counts, np.float64)[keep], 1.0)
        if not np.isfinite(s).all():
            return
        cand = [pool_idx[j] if self.pos is None else self.pos[pool_idx[j]] for j in keep]
        o, g = self.opts, self.opts.decay
        # running score scale: exponentially weighted mean and variance of the per-token scores
        m_new = g * self.mass + len(s)
        mu = (g * self.mass * self.mu + s.sum()) / m_new
        self.var = (g * self.mass * (self.var + (self.mu - mu) ** 2) + ((s - mu) ** 2).sum()) / m_new
        self.mu, self.mass = mu, m_new
        y = (s - self.mu) / np.sqrt(self.var + 1e-30) if self.var > 0 else np.zeros_like(s)  # (n,)
        Xb = self.X[cand].toarray()  # (n, D)
        self.A *= g
        self.A += Xb.T @ Xb
        self.b = g * self.b + Xb.T @ y
        self.w = _cg(self.A, o.ridge, self.b, self.w, o.cg_iters)
        self.updates += 1
        if self.updates % o.refresh == 0:
            self.pred = self.X @ self.w
            self._cdf = None

    # -------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        return {"A": torch.from_numpy(self.A.copy()), "b": torch.from_numpy(self.b.copy()),
                "w": torch.from_numpy(self.w.copy()), "pred": torch.from_numpy(self.pred.copy()),
                "mu": float(self.mu), "var": float(self.var), "mass": float(self.mass), "updates": int(self.updates),
                "options": asdict(self.opts)}

    def load_state_dict(self, state: dict) -> None:
        if state["options"] != asdict(self.opts):
            raise ValueError(f"the checkpoint's sampler options {state['options']} differ from this run's "
                             f"{asdict(self.opts)}")
        self.A, self.b, self.w = (state[k].numpy().copy() for k in ("A", "b", "w"))
        self.pred = state["pred"].numpy().copy()
        self.mu, self.var, self.mass, self.updates = state["mu"], state["var"], state["mass"], state["updates"]
        self._cdf = None


def _cg(A: np.ndarray, lam: float, b: np.ndarray, x: np.ndarray, iters: int) -> np.ndarray:
    """``iters`` conjugate-gradient iterations on (A + lam I) x = b from ``x`` (A symmetric PSD)."""
    r = b - (A @ x + lam * x)
    p, rs = r.copy(), float(r @ r)
    for _ in range(iters):
        if rs <= 1e-24:
            break
        Ap = A @ p + lam * p
        alpha = rs / float(p @ Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = float(r @ r)
        p, rs = r + (rs_new / rs) * p, rs_new
    return x


def guided_pool(opts: Guidance, *, rows: list | None = None, texts: list[str] | None = None,
                candidates: list[int] | None = None) -> GuidedPool:
    """A ``GuidedPool`` over the pool rows ``candidates`` (None: all), from the pool's ``texts`` or token ``rows``."""
    kind = opts.features if opts.features != "auto" else ("text" if texts is not None else "tokens")
    pick = (lambda xs: xs) if candidates is None else (lambda xs: [xs[i] for i in candidates])
    if kind == "text":
        if texts is None:
            raise ValueError("option 'features': 'text' needs the rows' texts")
        X = text_features(pick(texts), opts.dim)
    else:
        X = token_features(pick(rows), opts.dim)
    return GuidedPool(X, opts, candidates)


# ------------------------------------------------------------------------------------------------- the SFT sampler
class GeneralSampler:
    """Draws the general batch of a step (indices into the pool, plus target rows for mixing).

    ``spec.sampler``: pool | candidates (GREATS: 2n) | selected (the offline-selected ``selected`` pool) |
    random_subset | mixing. ``guide``: a ``GuidedPool`` over the pool (or over ``selected``), or None = uniform.
    ``spec.sampler_options["candidates"]`` (pool / selected; default 1): draw that many times n rows, a candidate
    batch for a feasible set that keeps a fraction of them (a subset with ``frac = 1 / candidates`` trains on n).
    """

    def __init__(self, spec, n_pool: int, n_target: int, n: int, rng: random.Random,
                 selected: list[int] | None = None, guide: GuidedPool | None = None):
        self.spec, self.n_pool, self.n_target, self.n, self.rng = spec, n_pool, n_target, n, rng
        self.selected, self.guide = selected, guide
        self.seconds = 0.0  # time spent drawing and learning (the sampler's overhead; not checkpointed)
        c = spec.sampler_options.get("candidates", 1)
        if isinstance(c, bool) or not isinstance(c, int) or c < 1 or (c > 1 and spec.sampler not in ("pool", "selected")):
            raise ValueError(f"sampler option 'candidates' must be an integer >= 1 (above 1 only with the pool or "
                             f"selected sampler), got {c!r} with sampler {spec.sampler!r}")
        self.candidates = 2 if spec.sampler == "candidates" else c  # GREATS: the pool's rows, 2n of them

    def _pool(self, k: int) -> list[int]:
        """k pool indices: the guided distribution, or uniform over the pool / the selected rows (as before)."""
        if self.guide is not None:
            return self.guide.draw(self.rng, k)
        if self.spec.sampler == "selected":
            return [self.selected[self.rng.randrange(len(self.selected))] for _ in range(k)]
        return [self.rng.randrange(self.n_pool) for _ in range(k)]

    def draw(self) -> list[tuple[str, int]]:
        t0 = time.perf_counter()
        try:
            return self._draw()
        finally:
            self.seconds += time.perf_counter() - t0

    def _draw(self) -> list[tuple[str, int]]:
        kind, rng, n = self.spec.sampler, self.rng, self.n
        if kind in ("pool", "selected", "candidates"):
            return [("g", i) for i in self._pool(n * self.candidates)]
        if kind == "random_subset":  # draw n, keep a random frac of them: top-k's budget without its signal
            keep = max(1, int(float(self.spec.sampler_options.get("frac", 0.5)) * n + 0.5))
            return [("g", i) for i in self._pool(n)][:keep]
        if kind == "mixing":  # target examples upsampled into the pool: each slot is a target w.p. p
            p = float(self.spec.sampler_options.get("target_prob", 0.1))
            return [("t", rng.randrange(self.n_target)) if rng.random() < p else ("g", self._pool(1)[0])
                    for _ in range(n)]
        raise ValueError(f"unknown sampler {kind!r}")

    def update(self, draw: list[tuple[str, int]], report) -> None:
        """Feed a step's per-sample scores to the guide (no-op for uniform sampling or a skipped step)."""
        if self.guide is None or report is None or report.skipped or report.scores is None or report.counts is None:
            return
        t0 = time.perf_counter()
        g = [(j, i) for j, (src, i) in enumerate(draw) if src == "g"]
        if g:
            idx = [j for j, _ in g]
            self.guide.update([i for _, i in g], report.scores.detach().double().cpu()[idx].numpy(),
                              report.counts.detach().double().cpu()[idx].numpy())
        self.seconds += time.perf_counter() - t0

    def state_dict(self) -> dict:
        return {} if self.guide is None else {"guide": self.guide.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.guide is not None and "guide" in state:
            self.guide.load_state_dict(state["guide"])


class GuidedTorchSampler(torch.utils.data.Sampler):
    """A ``DataLoader`` sampler drawing dataset indices from a ``GuidedPool`` (``len(guide.X)`` draws per epoch).

    Yielded indices are queued; ``feedback(report)`` pops the oldest ``len(report.scores)`` of them (the DataLoader
    consumes the sampler in order, so they are the indices of the batch that step trained on) and updates the guide.
    """

    def __init__(self, guide: GuidedPool, seed: int = 0):
        self.guide, self.rng = guide, random.Random(seed)
        self.pending: deque[int] = deque()

    def __len__(self) -> int:
        return self.guide.N

    def __iter__(self):
        for _ in range(self.guide.N):
            i = self.guide.draw(self.rng, 1)[0]
            self.pending.append(i)
            yield i

    def feedback(self, report) -> None:
        if report is None or report.scores is None or report.counts is None:
            return
        n = int(report.scores.numel())
        idx = [self.pending.popleft() for _ in range(min(n, len(self.pending)))]
        if report.skipped or len(idx) != n:
            return
        self.guide.update(idx, report.scores.detach().double().cpu().numpy(),
                          report.counts.detach().double().cpu().numpy())


def _trl_rows(trainer, ds) -> list[dict]:
    """Rows ``{"input_ids", "labels"}`` of a tokenized TRL SFT dataset, the loss on what the trainer trains on: the
    dataset's own ``labels`` (TRL >= 1.x builds them: the prompt masked with ``completion_only_loss``), else the
    completion / assistant mask, else every token."""
    args, cols = trainer.args, set(ds.column_names)
    mask_col = ("completion_mask" if "completion_mask" in cols and args.completion_only_loss in (None, True) else
                "assistant_masks" if "assistant_masks" in cols and args.assistant_only_loss else None)
    rows = []
    for r in ds:
        ids = list(r["input_ids"])
        if "labels" in cols:
            labels = list(r["labels"])
        else:
            keep = r[mask_col] if mask_col else [1] * len(ids)
            labels = [t if k else -100 for t, k in zip(ids, keep, strict=True)]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def prefilter_rows(kind: str, base, tokenizer, pool_rows: list[dict], target_rows: list[dict], frac: float,
                   seed: int) -> list[int]:
    """Sorted indices of the ``frac`` of ``pool_rows`` an offline selector keeps (rows ``{"input_ids", "labels"}``):
    ``dsir`` = importance resampling on hashed word n-grams of the decoded rows; ``less`` = the top LESS scores of
    ``base`` (``drpost.baselines.less``). Shared by ``drpost sft`` and ``DrSFTTrainer``."""
    if kind == "less":
        from drpost.baselines.less import less_scores, less_select

        return sorted(less_select(less_scores(base, tokenizer, pool_rows, target_rows, seed=seed), frac))
    from drpost.baselines.dsir import dsir_select

    def text(rows):
        return [{"prompt": tokenizer.decode(r["input_ids"]), "completion": ""} for r in rows]

    k = max(1, int(frac * len(pool_rows) + 0.5))
    return sorted(dsir_select(text(pool_rows), text(target_rows), k, seed=seed))


def _fresh_base(model):
    """A fresh module tree with ``model``'s base weights (PEFT adapters removed): the trainer's regularizer has
    already fitted its capture to the model's modules, and LESS needs its own on an unwrapped copy."""
    import copy

    if hasattr(model, "peft_config"):
        model = copy.deepcopy(model).unload()
    base = type(model)._from_config(model.config, torch_dtype=next(model.parameters()).dtype)
    base.load_state_dict(model.state_dict())
    return base.to(next(model.parameters()).device)


def setup_trl_sampler(trainer, dr_sampler, prefilter: str | None, frac: float) -> None:
    """``DrSFTTrainer``'s ``dr_prefilter`` (``trainer.train_dataset`` keeps the selector's ``frac``: ``"dsir"`` =
    DSIR on the decoded rows; ``"less"`` = the top LESS scores of the model as given, its adapters removed
    (``drpost.baselines.less``, single process)) and ``dr_sampler`` (``trainer.dr_sampler``: a
    ``GuidedTorchSampler`` on hashed token n-grams, or None = the Trainer's own sampler)."""
    if prefilter not in (None, "none", "dsir", "less"):
        raise ValueError(f"option 'dr_prefilter' must be None, 'dsir' or 'less', got {prefilter!r}")
    if prefilter in ("dsir", "less"):
        tok = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        base = None
        if prefilter == "less":
            if trainer.accelerator.num_processes > 1:
                raise NotImplementedError("dr_prefilter='less' runs in a single process (score the pool once, then "
                                          "pass the kept rows as train_dataset)")
            base = _fresh_base(trainer.accelerator.unwrap_model(trainer.model))
        keep = prefilter_rows(prefilter, base, tok, _trl_rows(trainer, trainer.train_dataset),
                              _trl_rows(trainer, trainer.target_dataset), frac, trainer.args.seed)
        trainer.train_dataset = trainer.train_dataset.select(keep)
    g = Guidance.of(dr_sampler)
    trainer.dr_sampler = None
    if g.on:
        if trainer.accelerator.num_processes > 1:
            raise NotImplementedError("dr_sampler='guided' runs in a single process (each rank would need the other "
                                      "ranks' scores)")
        g = Guidance(**{**asdict(g), "features": "tokens"})
        pool = guided_pool(g, rows=list(trainer.train_dataset["input_ids"]))
        trainer.dr_sampler = GuidedTorchSampler(pool, seed=trainer.args.seed)
        trainer.regularizer.report_scores = True  # full_training / target_only compute the scores too
