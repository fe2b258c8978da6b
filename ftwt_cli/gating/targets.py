"""Self-supervised ground-truth masks: which output channels of a unit "fire" for each sample.

Heatmap mass (FTWT, CVPR'22, §3.2): score each channel by its spatial max |activation|, normalise the
scores to sum 1, sort them in descending order and keep the smallest top-k whose cumulative mass reaches r.
r=1 therefore keeps every channel with any mass (drops only dead channels). Ties are broken by channel
index (lowest first, as a stable sort would), so the rule is deterministic. Uniform keeps the ceil(r·C)
highest-scoring channels.

Both rules only need k per sample, which depends on the sorted *values* alone; the kept set is then
"score above the k-th value, plus the lowest-index ties at it". So the ranking sorts values (no stable argsort),
and every tensor stays on the scores' device.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Mapping

import torch

from ..errors import FtwtError
from ..settings import GT_RULE_NAMES, check_r

__all__ = ["heatmap_mass", "uniform", "ground_truth", "ground_truth_many", "GT_RULES", "check_r"]

# A channel is kept while the mass *before* it is below r. The cumsum runs in float64 and this slack
# absorbs its rounding; r=1 is special-cased to exactly "any mass at all".
_EPS = 1e-9


def _sorted_asc(s: torch.Tensor) -> torch.Tensor:
    """(B, C) → each row's values in ascending order."""
    return s.sort(dim=1).values


def _top_k(s: torch.Tensor, asc: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, C) bool: the k[b] highest scores of row b, ties at the k-th value going to the lowest indices."""
    n = s.shape[1]
    kth = asc.gather(1, (n - k).clamp_max(n - 1)[:, None])              # (B, 1) the k-th largest value
    kth.masked_fill_((k == 0)[:, None], math.inf)                        # k = 0: keep nothing
    keep = s >= kth
    # More than k pass only if the (k+1)-th largest value ties the k-th: a (B, 1) check, not a count.
    nxt = asc.gather(1, (n - 1 - k).clamp_min(0)[:, None])
    if bool(((nxt == kth) & (k < n)[:, None]).any()):                   # rare: keep the lowest-index ties only
        extra = keep.sum(1) - k                                          # ties at the k-th value past the top-k
        tie = s == kth
        keep &= ~tie | (tie.cumsum(1) <= (tie.sum(1) - extra)[:, None])
    return keep


def heatmap_mass(scores: torch.Tensor, r: float) -> torch.Tensor:
    """scores: (B, C) non-negative → (B, C) bool, the smallest top-k reaching mass r per row."""
    s = scores.detach().float().contiguous()
    if r >= 1.0:
        return s > 0
    asc = _sorted_asc(s)                                                 # rank in float32 (fast) ...
    a = asc.double().cumsum(1)                                           # ... accumulate mass in float64
    total = a[:, -1:]
    # In descending order, channel j is kept while the mass before it is below r·total: the first always (if
    # any mass), then one more per descending prefix sum below r·total. A descending prefix sum is the total
    # minus an ascending one, so k counts the ascending sums above (1 − r)·total (the last, the total itself,
    # for the first channel), by a binary search since they are sorted. An all-zero row counts none; zero-score
    # channels never count, as the mass before them is already the total.
    k = a.shape[1] - torch.searchsorted(a, total * (1.0 - r + _EPS), right=True).squeeze(1)
    return _top_k(s, asc, k)


def uniform(scores: torch.Tensor, r: float) -> torch.Tensor:
    """Keep a fixed fraction r of the channels (the ceil(r·C) highest scores) in every row."""
    s = scores.detach().float().contiguous()
    k = max(1, math.ceil(r * s.shape[1] - _EPS))
    return _top_k(s, _sorted_asc(s), torch.full((s.shape[0],), k, dtype=torch.long, device=s.device))


GT_RULES: Dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {"mass": heatmap_mass, "uniform": uniform}
assert tuple(GT_RULES) == GT_RULE_NAMES      # the names the command line accepts are the rules that exist


def _rule(kind: str) -> Callable[[torch.Tensor, float], torch.Tensor]:
    try:
        return GT_RULES[kind]
    except KeyError:
        raise FtwtError(f"unknown ground-truth rule '{kind}'", f"use one of {', '.join(GT_RULES)}") from None


def ground_truth(scores: torch.Tensor, r: float, kind: str = "mass") -> torch.Tensor:
    return _rule(kind)(scores, r)


def ground_truth_many(scores: Mapping[str, torch.Tensor], r: float, kind: str = "mass") -> Dict[str, torch.Tensor]:
    """``ground_truth`` of several layers' (B, C) scores: the rules work row by row, so layers of one width are
    stacked and ranked together: a dozen operations per width instead of per layer (ResNet-18: 4 widths for
    17 layers). The masks returned are views of the stacked result."""
    rule, groups = _rule(kind), {}
    for name, s in scores.items():
        groups.setdefault((s.shape[1], s.dtype, s.device), []).append(name)
    out = {}
    for names in groups.values():
        if len(names) == 1:
            out[names[0]] = rule(scores[names[0]], r)
            continue
        keep = rule(torch.cat([scores[n] for n in names]), r)
        out.update(zip(names, keep.split([scores[n].shape[0] for n in names])))
    return {n: out[n] for n in scores}
