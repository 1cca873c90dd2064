"""Suite-wide settings: one torch thread per test process (pytest-xdist runs two processes on two cores; more
threads than cores makes OpenMP spin and tiny-model steps many times slower), and a throwaway model cache."""

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tests never write to the user's ~/.cache/drpost (the bundled tiny base model is still found)."""
    if "DRPOST_CACHE" not in os.environ:
        os.environ["DRPOST_CACHE"] = str(tmp_path_factory.mktemp("drpost-cache"))
    yield


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread, whatever an earlier run set (a resume test compares with a one-thread
    subprocess)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
