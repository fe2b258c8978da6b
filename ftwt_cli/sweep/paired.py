"""Paired comparison of two models on the same validation images: McNemar's exact test, and the plain sentence the
sweep ends with for each dynamic point.

Of the images exactly one of the two models gets right, b go to the first and c to the second; under "equally good"
b ~ Binomial(b + c, 1/2), and the two-sided p-value is 2·P(X ≤ min(b, c)), capped at 1 (exact for any b + c).
Per-image results are stored in ``sweep.json`` as packed bits (``pack``/``unpack``), in the order the evaluation
visits the images (the same for every point of a sweep).
"""
from __future__ import annotations

import base64
import math
from typing import Optional, Sequence, Tuple

__all__ = ["mcnemar", "pack", "unpack", "verdict"]


def pack(correct: Sequence[bool]) -> str:
    """Per-image top-1 results as base64 of their bits (8 images a byte, first image in the highest bit)."""
    out = bytearray((len(correct) + 7) // 8)
    for i, c in enumerate(correct):
        if c:
            out[i // 8] |= 0x80 >> (i % 8)
    return base64.b64encode(bytes(out)).decode()


def unpack(text: str, n: int) -> Tuple[bool, ...]:
    data = base64.b64decode(text)
    return tuple(bool(data[i // 8] & (0x80 >> (i % 8))) for i in range(n))


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> Tuple[int, int, float]:
    """(images only ``a`` gets right, images only ``b`` gets right, two-sided exact p-value)."""
    if len(a) != len(b):
        raise ValueError(f"the two models were evaluated on {len(a)} and {len(b)} images")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 0, 0, 1.0
    # log-space sum of C(n, i) / 2^n for i ≤ k (n may be thousands)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return only_a, only_b, min(1.0, 2 * tail)


def verdict(dynamic_top1: float, static_top1: float, p: Optional[float], cut: Optional[float], importance: str,
            alpha: float = 0.05, model: str = "dynamic model") -> str:
    """Which to use, in one sentence: the dynamic (or hybrid) point or its static twin at the same MACs."""
    d = (dynamic_top1 - static_top1) * 100
    at = f" at {cut:.0%} fewer MACs" if cut is not None else ""
    test = f" (McNemar p = {p:.3g})" if p is not None else ""
    if p is not None and p < alpha and d > 0:
        return f"use the {model}{at}: {d:+.2f} pt against the {importance} static twin{test}"
    if p is not None and p < alpha and d < 0:
        return f"use the static twin ({importance}){at}: {-d:.2f} pt ahead of the {model}, and a plain dense network{test}"
    return (f"use the static twin ({importance}){at}: the {model} is {d:+.2f} pt, not a significant difference"
            f"{test}, and the static model runs as a plain dense network")
