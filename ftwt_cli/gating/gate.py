"""FTWT's decision gate: global average pool of a unit's input, then a linear layer (C_in → C_out logits).

A conv unit's input is (B, C, H, W): the pool is over H, W. An MLP unit's input is channels last — (B, N, C) tokens
or (B, H, W, C) — and the pool is over every dim between the batch and the channels, so one mask per sample is
shared by all its tokens."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["Gate", "gate_key", "pool", "INIT_LOGIT"]

# Gates start open: zero weights and a positive bias give sigmoid(3) ≈ 0.95 > 0.5 for every channel.
INIT_LOGIT = 3.0


def gate_key(unit_name: str) -> str:
    """The gate's key in ``GatedModel.gates`` (ModuleDict keys may not contain dots)."""
    return unit_name.replace(".", "__")


class Gate(nn.Module):
    """logits = W · GAP(x) + b; an output channel runs iff sigmoid(logit) > 0.5, i.e. logit > 0."""

    def __init__(self, in_channels: int, out_channels: int, channels_last: bool = False) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.fc = nn.Linear(in_channels, out_channels)
        nn.init.zeros_(self.fc.weight)
        nn.init.constant_(self.fc.bias, INIT_LOGIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(pool(x, self.channels_last))


def pool(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(B, C) mean over the spatial or token dims of a unit's input."""
    if channels_last:
        return x.mean(dim=tuple(range(1, x.dim() - 1))) if x.dim() > 2 else x
    return x.mean(dim=(2, 3))
