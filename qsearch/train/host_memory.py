"""Keep freed host memory in a training process instead of handing it back to the OS.

Why: with glibc's default settings a training process on CPU may give large freed blocks back
to the kernel and take them again in the next step, and every page it takes again is a page
fault the kernel zero-fills. Whether it happens depends on glibc's adaptive thresholds meeting
the process's pattern of allocations, so it comes and goes from run to run. Measured with
``python benchmarks/bench_trainer.py --only fp32-cl,qsearch-cl --threads 1 --clock cpu
--malloc default|tuned`` (ResNet-20, batch 128, one thread), which prints faults and system
time per step: with glibc's settings, two of three runs had variants faulting 400-10,400
times per step (up to 23 ms of system time per step, on FP32 and QAT steps alike); with the
settings below, 0-3 faults and no system time in each of three runs. The step times of
those runs moved by no more than this machine's run-to-run noise (about +-10%), so no time
saving is claimed here; what is removed is the kernel's work, when it happens.

What it does: two ``mallopt`` settings, process-wide, once (:func:`keep_freed_memory`):

- ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's largest allowed value on 64-bit): blocks below it come
  from the heap, so freeing them does not unmap them;
- ``M_TRIM_THRESHOLD`` = 1 GiB: free memory at the top of the heap is kept up to that size
  rather than returned after every step.

The cost is memory: a process keeps up to its peak heap use (plus up to 1 GiB free) mapped,
as PyTorch's CUDA caching allocator does on the GPU. Blocks of 32 MiB and more (large
activations of ImageNet-size models) are still mapped and unmapped each time. Only glibc has
``mallopt``; elsewhere (macOS, musl) nothing changes. ``QSEARCH_MALLOC_TUNING=0`` leaves
malloc's settings alone. It is a speed setting: values computed are the same either way.
"""

from __future__ import annotations

import ctypes
import platform
import threading

from qsearch.config import defaults

#: ``mallopt`` parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 1 << 30

_lock = threading.Lock()
_state: str | None = None  # what keep_freed_memory did in this process, once it has run


def keep_freed_memory() -> str:
    """Apply the settings above once per process; returns what this process runs with:
    ``tuned``, ``off`` (``QSEARCH_MALLOC_TUNING=0``) or ``unavailable`` (not glibc, or glibc
    refused a value). Settings cannot be taken back, so ``off`` only holds when it is the
    first answer of the process."""
    global _state
    with _lock:
        if _state is not None:
            return _state
        if defaults.malloc_tuning() == "off":
            _state = "off"
        elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            _state = "unavailable"
        else:
            libc = ctypes.CDLL(None)  # the C library the interpreter itself links
            ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
            ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
            _state = "tuned" if ok else "unavailable"
        return _state


def applied() -> str | None:
    """What :func:`keep_freed_memory` settled for this process, or None before it ran."""
    return _state
