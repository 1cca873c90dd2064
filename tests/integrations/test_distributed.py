"""Data-parallel drpost on 2 gloo processes (CPU): ranks stay identical, and 2 processes == 1 process on the union.

The checks live in tests/integrations/dist_worker.py and run on every rank (torch.multiprocessing spawn, a free
TCP port on 127.0.0.1); any rank's failure fails the test. Run: ``.venv/bin/pytest -q tests/integrations/test_distributed.py``
"""

import pytest
import torch.distributed as dist

from tests.integrations.spawn import spawn_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def _spawn(which: str, world: int = 2, timeout: float = 240.0):
    from tests.integrations.dist_worker import run

    spawn_ranks(run, world, which, timeout=timeout, what=f"distributed workers ({which})")


def test_two_processes_match_one_and_stay_in_sync():
    """(a) full_training, global_subset, layerwise_subset, hull: identical parameters on both ranks after 3 AdamW
    steps; (b) exact scoring (and compress, same sketch): .grad, weights, scores, loss and row weights of the 2-process
    step equal the 1-process step on the union of both ranks' rows."""
    _spawn("all")
