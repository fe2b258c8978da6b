"""Exact per-sample MACs (multiply-accumulates, which papers call FLOPs) of a gated network.

For every conv, summed over its groups g:   MACs = Σ_g active_in_g · active_out_g · k_h·k_w · H_out·W_out
where active_in_g counts the input channels of group g that are not *structurally* zero in the tensor the
conv reads (a unit's mask carried through activations/pooling/concat; a residual sum is dense unless all
its terms are zero), and active_out_g counts the output channels the conv computes (its own mask when it
is gated). Depthwise convs (g = C) thus cost Σ_c in_c·out_c·k²·HW. A linear layer costs
active_in · active_out · tokens (an MLP's fc1 computes only its active hidden units, fc2 reads only them; a gated
MLP's two fc1 halves, or its gate and up projections, both compute only the active units' rows).
Attention computed outside conv/linear modules (QKᵀ and AV at L·S·(E + E_v) per head, projections applied with
F.linear) stays dense. A gate costs active_in · C_out (GAP → Linear; pooling is not a MAC); a gate of channel groups
active_in · groups.
A residual-stream unit masks a block's output after its add: the convs feeding that sum (its ``computes``) compute
only its kept filters, and whatever reads the block reads only them.
Norms, activations and pooling are not counted: that is ptflops' ``aten`` convention.

This module only does arithmetic on masks and shapes; it never runs a model. Counts are exact (integers held
in float64) and live on the masks' device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence

import torch

from ..arch.plan import Expr, MacOp, Unit, expr_width

__all__ = ["active_channels", "op_macs", "count_macs", "gated_share", "MacsBreakdown"]


def active_channels(expr: Expr, masks: Mapping[str, torch.Tensor], batch: int) -> Optional[torch.Tensor]:
    """(B, C) bool of channels that may be non-zero, or None when every channel may be.

    Float masks (0/1 in value, straight-through masks with a gradient: ``GatedModel.differentiable_macs``) give a
    float result with the same values: "any" is 1 − Π(1 − m), "all" is Π m, both exact on 0/1."""
    k = expr[0]
    if k == "dense":
        return None
    if k == "unit":
        return masks.get(expr[1])
    if k == "cat":
        parts = [active_channels(e, masks, batch) for e in expr[1]]
        present = [p for p in parts if p is not None]
        if not present:
            return None
        dev = present[0].device
        dtype = present[0].dtype
        return torch.cat([p if p is not None else torch.ones(batch, expr_width(e), dtype=dtype, device=dev)
                          for p, e in zip(parts, expr[1])], 1)
    if k == "slice":
        p = active_channels(expr[1], masks, batch)
        return None if p is None else p[:, int(expr[2]):int(expr[3])]
    if k == "any":
        parts = [active_channels(e, masks, batch) for e in expr[1]]
        if any(p is None for p in parts):
            return None
        if parts[0].dtype != torch.bool:
            closed = 1 - parts[0]
            for p in parts[1:]:
                closed = closed * (1 - p)
            return 1 - closed
        out = parts[0]
        for p in parts[1:]:
            out = out | p
        return out
    if k == "all":
        parts = [p for p in (active_channels(e, masks, batch) for e in expr[1]) if p is not None]
        if not parts:
            return None
        out = parts[0]
        for p in parts[1:]:
            out = out & p if out.dtype == torch.bool else out * p
        return out
    if k == "repeat":
        p = active_channels(expr[1], masks, batch)
        return None if p is None else p.repeat_interleave(int(expr[2]), dim=1)
    raise ValueError(f"unknown sparsity expression {expr!r}")


def _per_group(active: Optional[torch.Tensor], channels: int, groups: int, batch: int,
               device: torch.device) -> torch.Tensor:
    """(B, groups) float64 count of active channels per group."""
    if active is None:
        return torch.full((batch, groups), channels // groups, dtype=torch.float64, device=device)
    return active.reshape(batch, groups, channels // groups).sum(2, dtype=torch.float64)


def op_macs(op: MacOp, active_in: Optional[torch.Tensor], active_out: Optional[torch.Tensor], positions: int,
            batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B,) MACs of one conv/linear: Σ_g active_in_g · active_out_g · k_h·k_w · positions, where positions is
    H_out·W_out (tokens for a linear)."""
    a_in = _per_group(active_in, op.in_channels, op.groups, batch, torch.device(device))
    a_out = _per_group(active_out, op.out_channels, op.groups, batch, torch.device(device))
    return (a_in * a_out).sum(1) * (op.kernel_area * positions)


@dataclass(frozen=True)
class MacsBreakdown:
    total: torch.Tensor          # (B,) float64, per-sample MACs including gates
    gates: torch.Tensor          # (B,) float64, the gates' share
    per_op: Dict[str, torch.Tensor]


def count_macs(ops: Sequence[MacOp], units: Sequence[Unit], masks: Mapping[str, torch.Tensor],
               positions: Mapping[str, int], batch: int, *, gates_run: bool,
               device: Optional[torch.device | str] = None, attention: float = 0.0,
               gate_outputs: Optional[Mapping[str, int]] = None) -> MacsBreakdown:
    """Per-sample MACs of one forward. ``masks`` holds the (B, C_out) bool masks of gated units (missing =
    dense); ``positions`` the output positions each op saw in this forward (summed over calls); ``gates_run``
    adds each gate's cost, active_in · C_out (· its logits, ``gate_outputs[unit]``, for gates of channel groups). ``attention``: the per-sample MACs of attention computed outside conv/linear
    modules (QKᵀ, AV, functional projections), which stays dense. Results live on the masks' device (else ``device``, else CPU).
    A layer called more than once is counted dense on every call."""
    dev = torch.device(device) if device is not None else next((m.device for m in masks.values()), torch.device("cpu"))
    # ops computing only a unit's kept rows without being it: a SwiGLU's gate projection, a residual-stream unit's
    # convs feeding its masked sum
    owner = {u.partner: u.name for u in units if u.partner} | {n: u.name for u in units for n in u.computes}
    per_op: Dict[str, torch.Tensor] = {}
    for op in ops:
        if op.name not in positions:
            continue
        if op.calls != 1:
            per_op[op.name] = op_macs(op, None, None, positions[op.name], batch, dev)
        else:
            per_op[op.name] = op_macs(op, active_channels(op.in_expr, masks, batch), _out_mask(op, masks, owner),
                                      positions[op.name], batch, dev)
    gates = torch.zeros(batch, dtype=torch.float64, device=dev)
    if gates_run:
        for u in units:
            if u.name in masks and not u.follows:          # a follower has no gate
                a_in = _per_group(active_channels(u.in_expr, masks, batch), u.in_channels, 1, batch, dev)
                gates += a_in.squeeze(1) * (gate_outputs or {}).get(u.name, u.out_channels)
    total = gates + attention
    for v in per_op.values():
        total += v
    return MacsBreakdown(total, gates, per_op)


def _out_mask(op: MacOp, masks: Mapping[str, torch.Tensor], owner: Mapping[str, str]) -> Optional[torch.Tensor]:
    """The output channels ``op`` computes: its unit's mask (a SwiGLU gate projection follows its unit's, a conv
    feeding a residual-stream unit's sum that unit's; one fc1 chunked into a GLU's two halves computes the mask's rows
    in each half)."""
    m = masks.get(op.name, masks.get(owner.get(op.name, "")))
    if m is not None and m.shape[1] * 2 == op.out_channels:
        return torch.cat([m, m], 1)
    return m


def gated_share(units: Sequence[Unit], per_op: Mapping[str, torch.Tensor], total: float) -> float:
    """Share of a dense forward's MACs (sample 0) that gating scales down: each gated conv, and an MLP unit's
    fc1 and fc2 (fc2 reads only the hidden units fc1 keeps), with a gated MLP's second fc1."""
    names = ({u.name for u in units} | {u.reader for u in units if u.reader} | {u.partner for u in units if u.partner}
             | {n for u in units for n in u.computes})
    return sum(float(v[0]) for n, v in per_op.items() if n in names) / total
