"""Self-supervised ground-truth masks: which output channels of a unit "fire" for each sample.

Heatmap mass (FTWT, CVPR'22, §3.2): score each channel by its spatial max |activation|, normalise the
scores to sum 1, sort them in descending order and keep the smallest top-k whose cumulative mass reaches r.
r=1 therefore keeps every channel with any mass (drops only dead channels). Ties are broken by channel
index (stable sort), so the rule is deterministic. Uniform keeps the ceil(r·C) highest-scoring channels.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch

from .errors import FtwtError

__all__ = ["heatmap_mass", "uniform", "ground_truth", "GT_RULES", "check_r"]

# A channel is kept while the mass *before* it is below r. The cumsum runs in float64 and this slack
# absorbs its rounding; r=1 is special-cased to exactly "any mass at all".
_EPS = 1e-9


def check_r(r: float) -> float:
    if not isinstance(r, (int, float)) or math.isnan(r) or not 0.0 < r <= 1.0:
        raise FtwtError(f"r={r} is outside (0, 1]", "pass --r in (0, 1], e.g. --r 0.95 (1.0 drops only dead channels)")
    return float(r)


def _spread(sorted_keep: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(sorted_keep).scatter(1, order, sorted_keep)


def heatmap_mass(scores: torch.Tensor, r: float) -> torch.Tensor:
    """scores: (B, C) non-negative → (B, C) bool, the smallest top-k reaching mass r per row."""
    s = scores.detach().float()
    if r >= 1.0:
        return s > 0
    sorted_s, order = s.sort(dim=1, descending=True, stable=True)      # rank in float32 (fast) ...
    sorted_mass = sorted_s.double()
    sorted_mass = sorted_mass / sorted_mass.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    before = sorted_mass.cumsum(1) - sorted_mass                        # ... accumulate mass in float64
    keep = (before < r - _EPS) & (sorted_mass > 0)
    return _spread(keep, order)


def uniform(scores: torch.Tensor, r: float) -> torch.Tensor:
    """Keep a fixed fraction r of the channels (the ceil(r·C) highest scores) in every row."""
    s = scores.detach().float()
    k = max(1, math.ceil(r * s.shape[1] - _EPS))
    _, order = s.sort(dim=1, descending=True, stable=True)
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep[:, :k] = True
    return _spread(keep, order)


GT_RULES: Dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {"mass": heatmap_mass, "uniform": uniform}


def ground_truth(scores: torch.Tensor, r: float, kind: str = "mass") -> torch.Tensor:
    try:
        rule = GT_RULES[kind]
    except KeyError:
        raise FtwtError(f"unknown ground-truth rule '{kind}'", f"use one of {', '.join(GT_RULES)}") from None
    return rule(scores, r)
