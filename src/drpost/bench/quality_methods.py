"""The methods of the SFT quality benchmark: ``METHODS`` (name -> label, spec builder, knob values) and their groups.

A composed method names both parts: ``guided_<set>`` = the feasible set ``<set>`` on batches drawn by the score-guided
pool sampler (``drpost.trainers.samplers``); ``<selector>_prefilter_<set>`` = an offline selector (DSIR, LESS) narrows
the pool to the fraction ``knob``, and the feasible set regularizes within the kept rows; ``..._2n``: the same set on
candidate batches of 2n rows drawn from the kept rows, of which it keeps half (n trained rows a step, as every method
trains; the 2n forward and backward are GREATS's candidate budget). Knobs are tuned on the validation split like every
other method's (``drpost.bench.quality.run_quality``).
"""

from __future__ import annotations

from drpost.trainers.sft import MethodSpec

GUIDED = {"mode": "guided", "exploration": 0.2, "temperature": 1.0}  # the benchmark's guided-sampler options


def _guided(label: str, method: str, options: dict | None = None) -> MethodSpec:
    return MethodSpec(label, method, dict(options or {}), guidance=dict(GUIDED))


def _prefilter(label: str, method: str, frac: float, options: dict | None = None, candidates: int = 1) -> MethodSpec:
    sampler_options = {"select_frac": frac} | ({"candidates": candidates} if candidates > 1 else {})
    return MethodSpec(label, method, dict(options or {}), sampler="selected", sampler_options=sampler_options)


# name -> (label, spec builder(knob), knob values or None)
METHODS: dict[str, tuple[str, callable, list | None]] = {
    "full_training": ("FullTraining", lambda k: MethodSpec("FullTraining", "full_training"), None),
    "target_only": ("Target-only", lambda k: MethodSpec("Target-only", "target_only"), None),
    "mixing": ("Mixing", lambda k: MethodSpec("Mixing", "full_training", sampler="mixing",
                                              sampler_options={"target_prob": k}), [0.05, 0.2]),
    "random_subset": ("Random", lambda k: MethodSpec("Random", "full_training", sampler="random_subset",
                                                     sampler_options={"frac": 0.5}), None),
    "dsir": ("DSIR", lambda k: MethodSpec("DSIR", "full_training", sampler="selected",
                                          sampler_options={"select_frac": k}), [0.02, 0.1]),
    "less": ("LESS", lambda k: MethodSpec("LESS", "full_training", sampler="selected",
                                          sampler_options={"select_frac": k}), [0.02, 0.1]),
    # GREATS: greedy selection on per-sample token-mean losses of a 2n candidate batch, official update (token
    # mean over the kept rows; drpost.baselines.greats)
    "greats": ("GREATS", lambda k: MethodSpec("GREATS", "global_subset",
                                              {"selection": "greedy", "frac": 0.5, "scoring": "auto"},
                                              sampler="candidates", loss="greats", target_batch_size=2), None),
    "global_subset": ("GlobalSubset", lambda k: MethodSpec("GlobalSubset", "global_subset", {"frac": k}),
                      [0.25, 0.5]),
    "layerwise_subset": ("LayerWiseSubset", lambda k: MethodSpec("LayerWiseSubset", "layerwise_subset",
                                                                 {"frac": k}), [0.25, 0.5]),
    "hull": ("Hull", lambda k: MethodSpec("Hull", "hull"), None),
    "capped_simplex": ("CappedSimplex", lambda k: MethodSpec("CappedSimplex", "capped_simplex", {"k": k}), [2, 4]),
    "ball_auto": ("Ball(auto)", lambda k: MethodSpec("Ball(auto)", "ball", {"radius": "auto"}), None),
    "gem": ("GEM", lambda k: MethodSpec("GEM", "gem"), None),
    "layerwise_hull_slack": ("LayerHull+slack(auto)",
                             lambda k: MethodSpec("LayerHull+slack(auto)", "hull", {"scope": "layer", "slack": "auto"}),
                             None),
    "cone": ("Cone", lambda k: MethodSpec("Cone", "cone"), None),
    "span": ("Span", lambda k: MethodSpec("Span", "span"), None),
    "halfspace": ("Halfspace", lambda k: MethodSpec("Halfspace", "halfspace"), None),
    # composed: guided sampler + feasible set (knob: the subset fraction; guided_hull: the softmax temperature)
    "guided_global_subset": ("Guided+GlobalSubset",
                             lambda k: _guided("Guided+GlobalSubset", "global_subset", {"frac": k}), [0.25, 0.5]),
    "guided_layerwise_subset": ("Guided+LayerWiseSubset",
                                lambda k: _guided("Guided+LayerWiseSubset", "layerwise_subset", {"frac": k}),
                                [0.25, 0.5]),
    "guided_hull": ("Guided+Hull", lambda k: MethodSpec("Guided+Hull", "hull",
                                                        guidance={**GUIDED, "temperature": k}), [0.5, 1.0]),
    # composed: offline prefilter + feasible set (knob: the fraction of the pool the selector keeps)
    "dsir_prefilter_layerwise_subset": ("DSIR>LayerWiseSubset",
                                        lambda k: _prefilter("DSIR>LayerWiseSubset", "layerwise_subset", k,
                                                             {"frac": 0.5}), [0.02, 0.1]),
    "dsir_prefilter_hull": ("DSIR>Hull", lambda k: _prefilter("DSIR>Hull", "hull", k), [0.02, 0.1]),
    "less_prefilter_layerwise_subset": ("LESS>LayerWiseSubset",
                                        lambda k: _prefilter("LESS>LayerWiseSubset", "layerwise_subset", k,
                                                             {"frac": 0.5}), [0.02, 0.1]),
    "dsir_prefilter_layerwise_subset_2n": ("DSIR>LayerWiseSubset(2n)",
                                           lambda k: _prefilter("DSIR>LayerWiseSubset(2n)", "layerwise_subset", k,
                                                                {"frac": 0.5}, candidates=2), [0.02, 0.1]),
    "less_prefilter_layerwise_subset_2n": ("LESS>LayerWiseSubset(2n)",
                                           lambda k: _prefilter("LESS>LayerWiseSubset(2n)", "layerwise_subset", k,
                                                                {"frac": 0.5}, candidates=2), [0.02, 0.1]),
    "less_prefilter_hull": ("LESS>Hull", lambda k: _prefilter("LESS>Hull", "hull", k), [0.02, 0.1]),
    "dsir_prefilter_ball_auto": ("DSIR>Ball(auto)",
                                 lambda k: _prefilter("DSIR>Ball(auto)", "ball", k, {"radius": "auto"}), [0.02, 0.1]),
    "less_prefilter_ball_auto": ("LESS>Ball(auto)",
                                 lambda k: _prefilter("LESS>Ball(auto)", "ball", k, {"radius": "auto"}), [0.02, 0.1]),
}
COMPOSED = {m for m in METHODS if m.startswith("guided_") or "_prefilter_" in m}
DR_METHODS = {"global_subset", "layerwise_subset", "hull", "capped_simplex", "ball_auto", "gem",
              "layerwise_hull_slack"} | COMPOSED
SELECTION_BASELINES = {"dsir", "less", "greats", "random_subset"}
DEFAULT_METHODS = ["full_training", "target_only", "mixing", "random_subset", "dsir", "less", "greats", "global_subset",
                   "layerwise_subset", "hull", "capped_simplex", "ball_auto", "gem", "layerwise_hull_slack",
                   "guided_global_subset", "guided_layerwise_subset", "guided_hull", "dsir_prefilter_layerwise_subset",
                   "dsir_prefilter_hull", "less_prefilter_layerwise_subset"]


def prefilter_of(name: str) -> str | None:
    """The offline selector a method trains on (dsir, less, or None): ``dsir``, ``less``, ``<sel>_prefilter_*``."""
    if name in ("dsir", "less"):
        return name
    if "_prefilter_" in name:
        return name.split("_prefilter_")[0]
    return None
