"""Channel groups that fire together: which channels of a unit share a gate decision (``attach --group-size``).

A group's channels are kept or dropped together, so a group loses accuracy where its members disagree: a sample on
which one member fires and another does not. Given the ground-truth firing of every channel on a set of images,
``cofiring_groups`` fills the groups greedily: the next group is seeded with the unassigned channel that fires most
often, then grows by the unassigned channel that agrees most (fires, or stays off, on the same images) with the
members so far, until it has its size. Agreement of channels i and j over N images is
    A_ij = Σ_n [f_ni = f_nj] = Σ_n f_ni f_nj + Σ_n (1 − f_ni)(1 − f_nj),
from two (C, C) products of the 0/1 firing matrix, so only sums over images are needed (and add up over processes).
Channels that always fire end up together (their groups never drop), and so do channels that are off on the same
images. The groups keep the sizes they were attached with (G, the last one the remainder), so each unit's exact MACs
per decision stay as ``attach`` reported; only which channels are in which group changes. Nothing in the backbone
moves: a gate maps each channel to its group (``Gate.group_of``), so with open gates the model is the same function.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch

__all__ = ["CofiringStats", "cofiring_groups"]


class CofiringStats:
    """Sums over images of each unit's firing: count of images, Σ f (C,), and Σ f fᵀ (C, C), in float64."""

    def __init__(self) -> None:
        self.images = 0
        self.fires: Dict[str, torch.Tensor] = {}
        self.both: Dict[str, torch.Tensor] = {}

    def add(self, masks: Mapping[str, torch.Tensor]) -> None:
        """(B, C) bool ground-truth masks of one batch, by unit."""
        for name, m in masks.items():
            f = m.detach().to(torch.float64)
            self.fires[name] = self.fires.get(name, 0) + f.sum(0)
            self.both[name] = self.both.get(name, 0) + f.t() @ f
        self.images += next(iter(masks.values())).shape[0] if masks else 0

    def agreement(self, name: str) -> torch.Tensor:
        """(C, C) number of images on which channels i and j agree (both fire or both stay off)."""
        s, p, n = self.fires[name], self.both[name], self.images
        return p + (n - s[:, None] - s[None, :] + p)     # Σ(1−f_i)(1−f_j) = N − Σf_i − Σf_j + Σ f_i f_j


def cofiring_groups(agreement: torch.Tensor, fires: torch.Tensor, group_of: torch.Tensor) -> torch.Tensor:
    """A new channel → group map with the group sizes of ``group_of``, filled greedily by agreement (module doc).
    Deterministic: ties go to the lowest channel index."""
    c = agreement.shape[0]
    sizes = torch.bincount(group_of.cpu(), minlength=int(group_of.max()) + 1).tolist()
    a = agreement.detach().double().cpu()
    rate = fires.detach().double().cpu()
    free = torch.ones(c, dtype=torch.bool)
    out = torch.empty(c, dtype=torch.long)
    neg = torch.tensor(-float("inf"), dtype=torch.float64)
    for g, size in enumerate(sizes):
        seed = int(torch.where(free, rate, neg).argmax())
        members, score = [seed], a[seed].clone()
        free[seed] = False
        while len(members) < size:
            j = int(torch.where(free, score, neg).argmax())
            members.append(j)
            free[j] = False
            score += a[j]
        out[members] = g
    return out.to(group_of.device)
