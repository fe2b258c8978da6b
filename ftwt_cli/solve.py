"""A bracketed root-finder for monotone functions: what ``--target-cut`` (the r for a MACs cut) and the static twin
(the pruning ratio for a MACs target) both search with. Plain Python, no dependency: the bottom layer."""
from __future__ import annotations

from typing import Callable, Tuple

__all__ = ["solve_monotone"]


def solve_monotone(f: Callable[[float], float], a: float, b: float, fa: float, fb: float, target: float, tol: float,
                   max_tries: int = 30, x_tol: float = 1e-4) -> Tuple[float, float]:
    """(x, f(x)) with f(x) within ``tol`` of ``target``, for a monotone f whose values at a and b bracket it (the
    closest try if none lands that close). Safeguarded false position: interpolate between the bracket's ends, kept
    off them, and bisect every third try, so a curved f still converges in a handful of tries."""
    best = min(((a, fa), (b, fb)), key=lambda t: abs(t[1] - target))
    for i in range(max_tries):
        if abs(best[1] - target) <= tol or abs(b - a) < x_tol:
            break
        if i % 3 == 2 or fb == fa:
            x = (a + b) / 2
        else:
            x = a + (target - fa) * (b - a) / (fb - fa)
            lo, hi = min(a, b), max(a, b)
            x = min(max(x, lo + 0.05 * (hi - lo)), hi - 0.05 * (hi - lo))
        fx = f(x)
        if abs(fx - target) < abs(best[1] - target):
            best = (x, fx)
        if (fx - target) * (fa - target) > 0:      # same side as a: the target lies between x and b
            a, fa = x, fx
        else:
            b, fb = x, fx
    return best
