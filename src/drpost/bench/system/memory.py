"""System benchmark, peak memory: one more step of every method, after the timed repeats, measured for its peak.

Owned here: ``measure`` (per method: ``peak_mem_bytes``, ``step_mem_bytes``) and ``logits`` (what the LM head's
logits take, against the measured peak). Part of ``drpost.bench.system`` (run it with ``drpost bench system``).

CPU, peak resident memory (RSS) of this process, in the process itself: before the step, the C allocator hands
its free pages back to the kernel (glibc ``malloc_trim(0)``; freed memory it kept would otherwise be reused without
showing up in the RSS) and the kernel's peak-RSS mark is reset to the current RSS (``5`` written to
``/proc/self/clear_refs``, Linux 4.0 and later); after the step, ``VmHWM`` in ``/proc/self/status`` is the peak
RSS during the step. ``peak_mem_bytes`` = that peak: the whole process (interpreter and libraries, some hundreds
of MB; model, optimizer state; the step's tensors). ``step_mem_bytes`` = the peak minus the RSS at the step's
start: what the step itself adds (activations, captured factors, per-row gradients, logits, gradients, AdamW's
temporaries). The step is the method's steady state (warm-up and timed repeats have run), so the cost model's
choices and the optimizer state exist already. Not a forked child's ``ru_maxrss``: a child forked after torch has
run OpenMP with 2 threads hangs at its first parallel operation here (libgomp), and a child re-faults the library
pages the parent had resident, a bias that differs by method. Without ``clear_refs`` (not Linux) CPU memory is not
reported (None).

CUDA: ``torch.cuda.reset_peak_memory_stats``, then ``peak_mem_bytes`` = ``max_memory_allocated`` (tensors only:
model, optimizer state and the step's tensors) and ``step_mem_bytes`` = that minus ``memory_allocated`` at the
step's start.

The ratios (``peak_mem_ratio``, ``step_mem_ratio``, in ``measure.measure_case``) divide by the standard step's.

Logits: the SFT loss computes the LM head from the batch's earliest label position on (``objectives.sft.
causal_lm_loss``, ``label_window``: the last ``window_positions`` = k positions; the rows are labelled at every
position unless the benchmark's ``prompt_frac`` masks a prompt, and then k = T - prompt + 1). The loss
(``objectives.sft.token_logprobs``, which shifts the labels rather than slicing the logits, so no copy) holds up to
three logits-sized tensors at once in the backward: the log-softmax output it saved, its gradient and the logits'
gradient. ``logits_bytes`` = R T V 4, one such tensor at every position; ``window_logits_bytes`` = R k V 4, what
the loss holds per tensor with the window; ``window_saves_bytes`` their difference. Computing the head only at the
label positions (not a window but a gather) would make each ``label_positions x V``
(``head_at_labels_saves_bytes``, against every position).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _status_bytes(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise KeyError(key)


def cpu_peak_available() -> bool:
    """Whether this process can reset and read its peak RSS (Linux /proc)."""
    try:
        _CLEAR_REFS.write_text("5")
        _status_bytes("VmHWM")
        return True
    except (OSError, KeyError):
        return False


def _start(device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    _CLEAR_REFS.write_text("5")  # peak RSS := current RSS
    return _status_bytes("VmRSS")


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _status_bytes("VmHWM")


def measure(case, methods) -> dict[str, dict]:
    """One step of each method (``case.run``) with its memory measured (module docstring).
    -> {method name: {"peak_mem_bytes", "step_mem_bytes"}}; values None where the device gives no peak."""
    dev = case.device
    ok = dev.type == "cuda" or cpu_peak_available()
    out = {}
    for me in methods:
        if not ok:
            out[me.name] = {"peak_mem_bytes": None, "step_mem_bytes": None}
            continue
        start = _start(dev)
        case.run(me)
        peak = _peak(dev)
        out[me.name] = {"peak_mem_bytes": peak, "step_mem_bytes": max(peak - start, 0)}
    return out


def logits(case) -> dict:
    """Bytes of one logits-sized tensor at every position (R, T, V), on the loss window (R, k, V) and at the label
    positions only, and what the window and the label positions save (module docstring)."""
    labels = case.merged["labels"]  # (R, T)
    R, T = labels.shape
    elem = next(case.model.parameters()).element_size()
    label_pos = int((labels[:, 1:] != -100).sum())  # position t scores token t + 1
    full = R * T * case.vocab * elem
    window = R * case.head_T * case.vocab * elem
    at_labels = label_pos * case.vocab * elem
    return {"logits_bytes": full, "window_positions": case.head_T, "window_logits_bytes": window,
            "window_saves_bytes": full - window, "label_logits_bytes": at_labels,
            "head_at_labels_saves_bytes": full - at_labels, "label_positions": label_pos}
