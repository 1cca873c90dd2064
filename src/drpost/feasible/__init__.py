"""Feasible sets: the step's geometry in, update coefficients out. ``make_feasible`` maps names to classes."""

from __future__ import annotations

import difflib
import inspect

from drpost.feasible.base import Coefficients, FeasibleSet, StepGeometry
from drpost.feasible.subset import FullTraining, GlobalSubset, LayerWiseSubset, TargetOnly

SETS: dict[str, type[FeasibleSet]] = {
    "full_training": FullTraining,
    "target_only": TargetOnly,
    "global_subset": GlobalSubset,
    "layerwise_subset": LayerWiseSubset,
}

try:  # the convex family (docs/design.md, section 3)
    from drpost.feasible.convex import CONVEX_SETS

    SETS.update(CONVEX_SETS)
except ImportError:  # pragma: no cover - during development only
    pass


def make_feasible(method: str, **options) -> FeasibleSet:
    """Build a feasible set by name; unknown names and options raise ``ValueError`` naming them."""
    if method not in SETS:
        close = difflib.get_close_matches(str(method), SETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"option 'method': unknown feasible set {method!r}{hint}; choose from {sorted(SETS)}")
    cls = SETS[method]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "kw", "kwargs", "options"}
    for base in cls.__mro__[1:]:  # options a subclass forwards with **kw
        if base is FeasibleSet or base is object:
            break
        accepted |= set(inspect.signature(base.__init__).parameters) - {"self", "kw", "kwargs", "options"}
    for k in options:
        if k not in accepted:
            raise ValueError(f"option {k!r} does not apply to method {method!r} (it takes {sorted(accepted)})")
    return cls(**options)


__all__ = ["SETS", "make_feasible", "FeasibleSet", "StepGeometry", "Coefficients"]
