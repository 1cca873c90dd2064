"""Start the ranks of a distributed test: ``spawn_ranks(fn, world, *args)`` runs ``fn(rank, world, port, *args)`` in
``world`` processes (each test's worker sets up gloo on ``port``, a free local port) and fails the test, instead of
hanging, when they have not finished within ``timeout`` seconds (a collective that blocks)."""

from __future__ import annotations

import socket
import time

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn, world: int, *args, timeout: float = 300.0, what: str = "DDP workers") -> None:
    ctx = mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):  # raises in the test when a rank fails
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{what} did not finish in {timeout:.0f} s (a collective hung?)")
