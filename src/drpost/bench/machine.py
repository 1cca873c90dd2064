"""The machine record a benchmark writes beside its timings: what ran it and how fast its arithmetic is.

``device_name`` names a device as every benchmark record does (``cuda:0 (NVIDIA H200)``).
``machine_record(device, threads=..., clock=..., rates=...)`` gives the platform, the library versions, the thread
settings, the CPU's model and its native bf16 instructions (AVX512-BF16 / AMX: without them CPU bf16 is emulated
and slow), and the GEMM rate and copy bandwidth measured in the run's precision (``drpost.geometry.cost.calibrate``,
which the caller runs: the system benchmark's floors use the same rates). Used by ``drpost bench system`` and
``drpost bench trl``.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch


def cpu_identity() -> tuple[str, list[str]]:
    """(the CPU's model name, its native bf16 instruction sets among avx512_bf16 / amx_bf16) from /proc/cpuinfo
    where there is one, else (``platform.processor()``, [])."""
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, sorted(flags & {"avx512_bf16", "amx_bf16"})


def device_name(device) -> str:
    """The device as records name it: ``cpu``, or ``cuda:0 (NVIDIA H200)``."""
    device = str(device)
    if not device.startswith("cuda"):
        return device
    return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"


def machine_record(device: torch.device, *, threads: int | None, clock: str, rates, **versions: str) -> dict:
    """The record: ``device`` (named with the GPU's model on CUDA), ``threads`` (the run's setting; None = left as
    is), ``clock`` (``wall``, ``cpu`` or ``cuda_events``), ``rates`` (a ``cost.calibrate`` result) and the versions
    of any extra libraries (``trl="1.16.0"``)."""
    import transformers

    cpu_model, native_bf16 = cpu_identity()
    return {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, **versions, "device": device_name(device), "threads": threads,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "clock": clock, "cpu_model": cpu_model,
            "native_bf16": native_bf16, "gemm_gflops": rates.flops_per_s / 1e9, "bandwidth_gbs": rates.bytes_per_s / 1e9}


__all__ = ["cpu_identity", "device_name", "machine_record"]
