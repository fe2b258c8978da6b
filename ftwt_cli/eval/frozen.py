"""The gates' own decisions frozen into one static mask: the control that says whether per-image choice pays.

From a run's firing rates on the validation images, keep every channel that fires on at least a share t of them,
with t chosen so that the frozen mask costs the dynamic model's mean MACs (gates included on the dynamic side, none on
the frozen side: a static mask needs no gate). If the frozen mask scores as well as the gates, the dynamic model is a
static mask with gate overhead.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence, Tuple

import torch

from ..gating.model import GatedModel
from ..solve import solve_monotone

__all__ = ["frozen_masks"]


@torch.no_grad()
def frozen_masks(model: GatedModel, fire_rate: Mapping[str, torch.Tensor], target_macs: float,
                 input_size: Sequence[int]) -> Tuple[Dict[str, torch.Tensor], float]:
    """((C_out,) bool mask per gated layer, its MACs per sample without gates): the channels firing on at least a
    share t of the images, t such that the MACs come closest to ``target_macs``."""
    p = next(model.parameters())
    x = torch.zeros(1, *input_size, dtype=p.dtype, device=p.device)
    mode, r = model.mode, model.r
    model.set_gates("predict", r=r)

    def masks_at(t: float) -> Dict[str, torch.Tensor]:
        return {n: (rate >= t) for n, rate in fire_rate.items()}

    def macs(t: float) -> float:
        with model.forcing({n: m[None].to(p.device) for n, m in masks_at(t).items()}):
            model(x)
        s = model.last_stats
        return float(s.macs[0] - s.gate_macs[0])

    try:
        hi = 1.0 + 1e-6                       # nothing fires that often: every gated channel off
        t, m = solve_monotone(macs, 0.0, hi, macs(0.0), macs(hi), target_macs, tol=1e-3 * target_macs)
    finally:
        model.set_gates(mode, r=r)
    return masks_at(t), m
