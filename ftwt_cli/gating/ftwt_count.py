"""MACs as FTWT's released code counts them, for comparison with the paper only (ftwt's own count is ``macs``).

FTWT's ``ConvWithMask`` counts a gated conv as active_out · H·W · (prev // groups) · k², where prev is the active count
of the previous gated conv in module order. Three things differ from the exact count (``docs/macs.md``): in a residual
network prev is the pre-add count of the block's last conv, although the add makes the stream dense again; the gates
cost nothing; and ``prev // groups`` is 0 for a depthwise conv as soon as one of its input channels is off, so masked
depthwise convs are free. Layers without a gate are counted dense; MLP units and the convs feeding a residual-stream
unit's sum (which FTWT's counter does not handle) and attention as in the exact count.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..arch.plan import MacOp, Unit
from .macs import op_macs

__all__ = ["ftwt_counter_macs"]


def ftwt_counter_macs(ops: Sequence[MacOp], units: Sequence[Unit], stats, attention: float = 0.0) -> torch.Tensor:
    """(B,) MACs of the forward that produced ``stats`` (a ``ForwardStats``) in FTWT's convention."""
    masks = stats.masks
    batch = stats.macs.shape[0]
    dev = stats.macs.device
    conv_units = {u.name for u in units if u.kind == "conv"}
    # counted exactly: MLP units' layers, and the convs feeding a residual-stream unit's sum (FTWT has neither)
    mlp_ops = {n for u in units if u.kind != "conv" for n in (u.name, u.reader, u.partner, *u.computes) if n}
    total = torch.full((batch,), float(attention), dtype=torch.float64, device=dev)
    prev: Optional[torch.Tensor] = None          # active count of the last gated conv, per sample
    prev_width = 0
    for op in ops:
        if op.name not in stats.positions:
            continue
        dense = op_macs(op, None, None, stats.positions[op.name], 1, dev)[0]
        if op.name in conv_units and op.name in masks and op.calls == 1:
            out = masks[op.name].sum(1).double()
            a_in = prev if prev is not None and prev_width == op.in_channels else torch.full_like(out, op.in_channels)
            per_group_in = torch.div(a_in, op.groups, rounding_mode="floor")
            total += dense * (out / op.out_channels) * (per_group_in / (op.in_channels // op.groups))
            prev, prev_width = out, op.out_channels
        elif op.name in mlp_ops and op.name in stats.per_layer:
            total += stats.per_layer[op.name].double()
        else:
            total += dense
    return total
