"""Hit a MACs budget: the r whose oracle masks cut a target share of the MACs, found by bisection.

The oracle (the ground-truth rule applied to each input itself) is what fitted gates learn to imitate, so its cut
at r is the budget fit-gates aims for (the paper's FLOPs estimate; the fitted gates land near it and finetune moves
it a little, see benchmarks/RESULTS.md). The cut shrinks as r grows: r = 1 drops only dead channels, r → 0 keeps one
channel per gated layer, so the reachable range is [cut(1), cut(R_MIN)]. A bracketed search on r (false position
with bisection steps) stops when the cut on the calibration images is within ``tol`` of the target.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

import torch

from ..data import make_loader
from ..errors import FtwtError
from ..gating.model import GatedModel
from ..runtime.dist import all_sum, shard
from ..settings import check_cut
from ..solve import solve_monotone
from .evaluate import evaluate_loader

if TYPE_CHECKING:
    from ..runtime.device import Precision
    from ..runtime.dist import Dist

__all__ = ["RChoice", "find_r", "calibration_batches", "R_MIN", "DEFAULT_CALIB_SAMPLES"]

R_MIN = 1e-4                 # below this the rule keeps one channel per layer: the largest cut there is
DEFAULT_CALIB_SAMPLES = 2048


@dataclass(frozen=True)
class RChoice:
    r: float
    cut: float                          # oracle MACs cut at r on the calibration images
    target: float
    reachable: Tuple[float, float]      # cut at r = 1 and at r → 0
    samples: int
    tries: List[Tuple[float, float]] = field(default_factory=list)   # (r, cut) evaluated

    def describe(self) -> str:
        return (f"target cut {self.target:.1%}: r = {self.r:.4g} (oracle cut {self.cut:.1%} on {self.samples} calibration "
                f"images; reachable {self.reachable[0]:.1%}–{self.reachable[1]:.1%})")


def find_r(model: GatedModel, batches: List[Tuple[torch.Tensor, torch.Tensor]], target: float, *, tol: float = 0.0025,
           precision: Optional["Precision"] = None, dist: Optional["Dist"] = None,
           on_try: Optional[Callable[[float, float], None]] = None) -> RChoice:
    """The r in (0, 1] whose oracle masks cut ``target`` of the MACs (gates not counted: the oracle runs none) on
    ``batches`` (the calibration images, held in memory so each try skips decoding). Under torchrun each process
    passes its shard and every process gets the same r. Leaves the model's gate mode as it was."""
    check_cut(target)
    mode, r0, gt = model.mode, model.r, model.gt
    tries: List[Tuple[float, float]] = []

    def cut(r: float) -> float:
        model.set_gates("oracle", r=r)
        res = evaluate_loader(model, batches, precision=precision, dist=dist)
        tries.append((r, res.reduction))
        if on_try:
            on_try(r, res.reduction)
        return res.reduction

    try:
        n = sum(len(y) for _, y in batches)
        if dist is not None and dist.active:
            n = int(all_sum({"n": n}, dist, next(model.parameters()).device)["n"])
        lo_cut, hi_cut = cut(1.0), cut(R_MIN)
        if not lo_cut - tol <= target <= hi_cut + tol:
            raise FtwtError(f"--target-cut {target} cannot be reached: the heatmap-mass rule cuts {lo_cut:.1%} (r = 1) to "
                            f"{hi_cut:.1%} (r → 0) of this model's MACs on {n} calibration images",
                            f"pass --target-cut between {lo_cut:.3f} and {hi_cut:.3f}")
        r, c = solve_monotone(cut, 1.0, R_MIN, lo_cut, hi_cut, target, tol)
        return RChoice(round(r, 6), c, target, (lo_cut, hi_cut), n, tries)
    finally:
        model.set_gates(mode, r=r0, gt=gt)


def calibration_batches(ds, batch_size: int, workers: Optional[int], dist: Optional["Dist"] = None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The calibration images as a list of CPU batches (this process's shard under torchrun)."""
    if dist is not None:
        ds = shard(ds, dist)
    return [(x, y) for x, y in make_loader(ds, batch_size, train=False, workers=workers)]
