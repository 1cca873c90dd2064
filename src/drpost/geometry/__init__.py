"""Per-sample gradient geometry: capture (A, B) in one backward, per-layer kernels, cost model, oracle.

Knows nothing of losses or trainers. ``capture.py`` installs handlers; ``kernels.py`` computes scores, Grams and the
weighted update per block; ``cost.py`` picks a scoring method per block; ``oracle.py`` is the torch.func reference.
"""

from drpost.geometry.capture import Block, Capture
from drpost.geometry.kernels import METHODS, Sketcher, assemble, block_stats

__all__ = ["Block", "Capture", "METHODS", "Sketcher", "assemble", "block_stats"]
