"""FTWT's decision gate: global average pool of a unit's input, then a linear layer (C_in → one logit per group).

A conv unit's input is (B, C, H, W): the pool is over H, W. An MLP unit's input is channels last — (B, N, C) tokens
or (B, H, W, C) — and the pool is over every dim between the batch and the channels, so one mask per sample is
shared by all its tokens.

Channel groups (``group_size`` G > 1): the linear layer has ceil(C_out / G) outputs, one per group of G channels
(the last group holds the remainder when G does not divide C_out), and ``group_of`` maps each channel to its group.
The gate's logits are returned per *channel* (each channel carries its group's logit), so everything that reads
them — masks, the loss summed over filters, the MACs count — works on channels as with G = 1, and a group's
channels always fire together. ``group_of`` starts as contiguous blocks (channel c in group c // G); ``set_groups``
re-assigns channels (co-firing order, ``gating.cofire``), with every group keeping its size.

Channels without a gate (``fixed_open`` of them, a hybrid model's channels that fire on nearly every image,
``runs.hybrid``): ``group_of`` maps them past the last group, to a column that is always open (logit ``OPEN_LOGIT``,
target 1), so the linear layer computes logits only for the channels whose decisions vary."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..errors import FtwtError

__all__ = ["Gate", "gate_key", "pool", "INIT_LOGIT", "OPEN_LOGIT", "check_group_size"]

# Gates start open: zero weights and a positive bias give sigmoid(3) ≈ 0.95 > 0.5 for every channel.
INIT_LOGIT = 3.0
# The logit of a channel without a gate: always open; BCE against its target 1 is log(1 + e^-30) ≈ 1e-13 (and it has
# no parameters), so it adds nothing to the loss. Finite, so that float16 holds it.
OPEN_LOGIT = 30.0


def gate_key(unit_name: str) -> str:
    """The gate's key in ``GatedModel.gates`` (ModuleDict keys may not contain dots)."""
    return unit_name.replace(".", "__")


def check_group_size(g: int) -> int:
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise FtwtError(f"--group-size {g!r} is not a positive integer", "pass 1 (every channel its own gate), 8, 16 or 32")
    return g


class Gate(nn.Module):
    """logits = W · GAP(x) + b, one per group, read out per channel; a channel runs iff sigmoid(logit) > 0.5,
    i.e. logit > 0."""

    def __init__(self, in_channels: int, out_channels: int, channels_last: bool = False, group_size: int = 1,
                 fixed_open: int = 0) -> None:
        super().__init__()
        if not 0 <= fixed_open < out_channels:
            raise ValueError(f"a gate of {out_channels} channels cannot leave {fixed_open} of them without a gate")
        self.channels_last = channels_last
        # a count fixed at construction (set_groups and a loaded map keep every column's size): read on every
        # forward, so a Python int rather than a reduction over ``group_of`` (a device sync on CUDA)
        self._fixed_open = int(fixed_open)
        varying = out_channels - fixed_open
        self.fc = nn.Linear(in_channels, -(-varying // group_size))
        nn.init.zeros_(self.fc.weight)
        nn.init.constant_(self.fc.bias, INIT_LOGIT)
        self.group_of: Optional[torch.Tensor]
        if group_size > 1 or fixed_open:  # only these gates carry the map, so plain runs keep their state-dict keys
            open_col = torch.full((fixed_open,), self.fc.out_features, dtype=torch.long)
            self.register_buffer("group_of", torch.cat([torch.arange(varying) // group_size, open_col]))
        else:
            self.group_of = None

    @property
    def groups(self) -> int:
        """The logits the gate computes: one per group of channels whose decisions vary."""
        return self.fc.out_features

    @property
    def fixed_open(self) -> int:
        """Channels without a gate (always open)."""
        return self._fixed_open

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_pooled(pool(x, self.channels_last))

    def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C_in) pooled input → (B, C_out) per-channel logits."""
        return self.channels(self.fc(pooled), OPEN_LOGIT)

    def group_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, C_out) per-channel scores → (B, groups) sums: a group's share of the heatmap mass."""
        if self.group_of is None:
            return scores
        out = scores.new_zeros(scores.shape[0], self.groups + 1)      # the last column: the always-open channels
        return out.index_add_(1, self.group_of, scores)[:, :self.groups]

    def channels(self, group_mask: torch.Tensor, fill: float = 1.0) -> torch.Tensor:
        """(B, groups) logits or masks → (B, C_out): each channel takes its group's value; a channel without a gate
        takes ``fill`` (True for a bool mask; pass ``OPEN_LOGIT`` for logits)."""
        if self.group_of is None:
            return group_mask
        if self.fixed_open:
            col = group_mask.new_full((group_mask.shape[0], 1), True if group_mask.dtype == torch.bool else fill)
            group_mask = torch.cat([group_mask, col], dim=1)
        return group_mask.index_select(1, self.group_of)

    @torch.no_grad()
    def set_groups(self, group_of: torch.Tensor) -> None:
        """Re-assign channels to groups; every group keeps its size (so exact MACs per group stay as attached)."""
        if self.group_of is None:
            raise ValueError("an ungrouped gate has no groups to re-assign")
        g = group_of.to(self.group_of)
        n = self.groups + 1
        if g.shape != self.group_of.shape or not torch.equal(torch.bincount(g, minlength=n),
                                                             torch.bincount(self.group_of, minlength=n)):
            raise ValueError("a group assignment must keep every group's size")
        self.group_of.copy_(g)


def pool(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(B, C) mean over the spatial or token dims of a unit's input."""
    if channels_last:
        return x.mean(dim=tuple(range(1, x.dim() - 1))) if x.dim() > 2 else x
    return x.mean(dim=(2, 3))
