"""Data-parallel helpers, re-exported: the data-parallel step lives in the core (``drpost.geometry.distributed``),
since ``DataRegularizer`` itself runs it. Kept here so ``drpost.integrations.distributed`` imports keep working."""

from drpost.geometry.distributed import (  # noqa: F401
    DistributedStep,
    all_gather_rows,
    all_reduce_grads,
    broadcast_parameters,
    max_parameter_divergence,
    resolve_process_group,
)

__all__ = [
    "DistributedStep",
    "all_gather_rows",
    "all_reduce_grads",
    "broadcast_parameters",
    "max_parameter_divergence",
    "resolve_process_group",
]
