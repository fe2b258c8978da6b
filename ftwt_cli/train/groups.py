"""Before fit-gates' first epoch: channels ordered into groups that fire together (gates of ``--group-size`` > 1).

The ground truth of every channel, ranked per channel at the fit's r, is collected with the gates open (the dense
model's activations, which the ground truth is defined on) over the calibration images; under torchrun every
process adds its shard and the sums are all-reduced, so every process computes the same groups
(``gating.cofire.cofiring_groups``)."""
from __future__ import annotations

from typing import Iterable, Tuple

import torch

from ..gating.cofire import CofiringStats, cofiring_groups
from ..gating.gate import gate_key
from ..gating.model import GatedModel
from ..gating.targets import ground_truth
from ..runtime.device import Precision
from ..runtime.dist import Dist, all_sum_tensor

__all__ = ["order_groups"]


@torch.no_grad()
def order_groups(model: GatedModel, batches: Iterable, r: float, gt: str, precision: Precision,
                 dist: Dist = Dist()) -> Tuple[float, float]:
    """Re-assign every grouped gate's channels to groups by co-firing on ``batches``; returns the group purity before
    and after (``_purity``, means over units: 1.0 when every group's channels fire on the same images)."""
    grouped = {u.name: model.gates[gate_key(u.name)] for u in model.units
               if not u.follows and model.gates[gate_key(u.name)].group_of is not None}
    if not grouped:
        return 1.0, 1.0
    mode, was = model.mode, model.training
    model.set_gates("open").eval()
    stats = CofiringStats()
    try:
        for b in batches:
            x = b[0] if isinstance(b, (list, tuple)) else b
            with model.collecting(), precision.autocast():
                model(precision.batch(x))
            stats.add({n: ground_truth(s, r, gt) for n, s in model.last_scores.items() if n in grouped})
    finally:
        model.mode = mode
        model.train(was)
    dev = precision.device
    stats.images = int(all_sum_tensor(torch.tensor([float(stats.images)], dtype=torch.float64), dist, dev)[0])
    before, after = [], []
    for name, gate in grouped.items():
        stats.fires[name] = all_sum_tensor(stats.fires[name], dist, dev)
        stats.both[name] = all_sum_tensor(stats.both[name], dist, dev)
        agree = stats.agreement(name)
        before.append(_purity(agree, gate.group_of.cpu(), stats.images))
        gate.set_groups(cofiring_groups(agree, stats.fires[name], gate.group_of))
        after.append(_purity(agree, gate.group_of.cpu(), stats.images))
    return sum(before) / len(before), sum(after) / len(after)


def _purity(agree: torch.Tensor, group_of: torch.Tensor, n: float) -> float:
    """Mean over channels of the share of images on which a channel agrees with the other members of its group
    (pairwise agreement within groups; 1.0 for groups of one)."""
    same = group_of[:, None] == group_of[None, :]
    size = same.sum(1).double()
    within = (agree * same).sum(1) - n                  # minus the channel's agreement with itself
    share = torch.where(size > 1, within / ((size - 1).clamp_min(1) * max(n, 1.0)), torch.ones_like(size))
    return float(share.mean())
