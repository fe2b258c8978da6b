"""Process-wide settings that the ``ftwt`` command applies once at start-up (a library import changes nothing).

glibc's malloc hands large freed blocks back to the kernel: blocks over a threshold (128 KiB at first, raised
as such blocks are freed) get their own mmap, and free space at the top of the heap is trimmed. A training
step allocates and frees the same few-MiB activations every batch, so their pages are faulted in again and
zeroed by the kernel each time: 5,000-8,000 minor page faults per batch for ResNet-18 at 32 px here, which
cost a fit-gates epoch on Fashion-MNIST about 10% of its time (measured on a 2-core CPU). Keeping freed memory
in the process instead — blocks under 1 GiB come from the heap, whose top is not trimmed — removes them;
the price is that the process keeps its peak heap until it exits, which a training command does anyway.
This is what glibc's ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` variables do, set from inside.
"""
from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks under this come from the heap. Some glibc versions refuse more than 32 MiB (HEAP_MAX_SIZE / 2);
# 2.36 takes 1 GiB, which also covers 224 px activations (a 32-image ResNet stem output is ~100 MiB).
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)
_TRIM_THRESHOLD = (1 << 31) - 1          # mallopt takes an int: "never trim" in practice

_done = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks for reuse; True if it took effect.

    Both thresholds must be set together: setting either one alone also turns off glibc's dynamic mmap
    threshold, and the trim threshold alone leaves every block over 128 KiB to mmap (measured: 7× more page
    faults). A no-op off Linux/glibc."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:        # glibc's soname; not found under musl, whose malloc has no such knobs
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = any(mallopt(_M_MMAP_THRESHOLD, t) for t in _MMAP_THRESHOLDS) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _done
