"""The one timer of the fast path: median (and p90) wall-clock milliseconds of a call after warm-up. On CUDA the
device is synchronised around every call, so a timing is the kernel's, not the launch's."""
from __future__ import annotations

import time
from typing import Callable, Optional, Tuple

import torch

__all__ = ["time_ms", "median_ms"]


def _sync(device: Optional[torch.device]) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], warmup: int, reps: int, device: Optional[torch.device] = None) -> Tuple[float, float]:
    """(p50, p90) milliseconds of ``reps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    return ts[len(ts) // 2], ts[min(len(ts) - 1, int(round(0.9 * (len(ts) - 1))))]


def median_ms(fn: Callable[[], object], warmup: int, reps: int, device: Optional[torch.device] = None) -> float:
    return time_ms(fn, warmup, reps, device)[0]
