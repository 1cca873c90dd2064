"""drpost: data-regularized LLM post-training (Dr. Post-Training, arXiv 2605.07063).

At each step, per-sample gradients of a general batch define a feasible set of update directions; the update is the
projection of the target gradient onto that set. See ``DataRegularizer``.
"""

from drpost import objectives
from drpost.step import DataRegularizer, StepReport

__all__ = ["DataRegularizer", "StepReport", "objectives"]
__version__ = "0.1.0"
