"""Channel groups made contiguous: each grouped unit's channels re-indexed once so that a group's channels sit side by
side (issue 29, item 2).

Co-firing groups (``gating.cofire``) gather channels from anywhere in a unit, so a kept set of groups is scattered
and the compact path gathers weight rows one by one. Permuting the unit's channels so that group g occupies one
contiguous range (``group_of`` non-decreasing, the always-open channels last) makes a kept group a slice, and a run
of kept groups one slice: a view of the weights, not a gather.

The permutation is an exact re-indexing: with p the new order (new channel c is old channel p[c]), the unit's conv
or fc1 rows and bias, its norm's affine parameters and running statistics, the rows of the depthwise convs that
follow it, the input columns of every layer that reads it and the input columns of those layers' gates all move by
the same p; nothing is recomputed. Which tensors read a unit's output is Torch-Pruning's dependency graph: the
group of the unit's output channels, with one index per channel in each layer it reaches (an offset through a
concat is followed; a flatten that spreads a channel over many inputs is not permuted). A unit whose group reaches
another unit's outputs (a residual block's conv2, masked before the add: its channels are the stream's, shared by
every block of the stage) is left in place, as is any unit whose group holds a layer this module does not know how
to permute (named in the result). The unit's own outputs are bit-exact after the re-indexing; layers that read them
sum the same products in another order, so the model's outputs agree to float rounding, not bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from ..gating.gate import gate_key
from ..gating.model import GatedModel

__all__ = ["Contiguous", "contiguous_groups"]

# (module name, tensor name, dim, positions): new tensor.index_select(dim, positions)
_Edit = Tuple[str, str, int, torch.Tensor]


@dataclass(frozen=True)
class Contiguous:
    """What ``contiguous_groups`` did: unit → p (new channel c is old channel p[c]) for the units it permuted, and
    unit → why for the grouped units it left in place."""
    permuted: Dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        text = f"{len(self.permuted)} of {len(self.permuted) + len(self.skipped)} grouped units re-indexed so that each group is contiguous"
        if self.skipped:
            first, why = next(iter(self.skipped.items()))
            text += f"; {len(self.skipped)} left in place ({first}: {why})"
        return text


def _tensors(m: nn.Module, out: bool) -> List[Tuple[str, int]]:
    """(tensor name, dim) of module ``m`` that a permutation of its output (``out``) or input channels moves; raises
    ValueError for a module whose channels it cannot move."""
    if isinstance(m, nn.modules.conv._ConvNd):
        if m.transposed:
            raise ValueError("a transposed conv")
        if m.groups == m.in_channels == m.out_channels:          # depthwise: filter j reads channel j
            return [("weight", 0)] + ([("bias", 0)] if m.bias is not None else [])
        if m.groups != 1:
            raise ValueError(f"a grouped conv ({m.groups} groups)")
        return ([("weight", 0)] + ([("bias", 0)] if m.bias is not None else [])) if out else [("weight", 1)]
    if isinstance(m, nn.Linear):
        return ([("weight", 0)] + ([("bias", 0)] if m.bias is not None else [])) if out else [("weight", 1)]
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return [(n, 0) for n in ("weight", "bias", "running_mean", "running_var") if getattr(m, n, None) is not None]
    if not any(True for _ in m.parameters(recurse=False)) and not any(True for _ in m.buffers(recurse=False)):
        return []                                                # an activation, a pool: nothing to move
    raise ValueError(f"a {type(m).__name__}")


def _unit_edits(dg, group, unit: str, own: Sequence[str], order: torch.Tensor, names: Dict[nn.Module, str],
                gated: Dict[str, str]) -> List[_Edit]:
    """The tensor moves that re-index one unit's output channels by ``order``; ValueError says why it cannot."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    edits: Dict[Tuple[str, str, int], torch.Tensor] = {}
    for item in group.items:
        m = item.dep.target.module
        if not isinstance(m, nn.Module):
            raise ValueError("its channels reach a bare parameter")
        name = names.get(m)
        out = dg.is_out_channel_pruning_fn(item.dep.handler)
        moves = _tensors(m, out)
        if not moves:
            continue
        if out and isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and name not in own:
            raise ValueError(f"coupled to the outputs of {name}")
        idxs, roots = list(item.idxs), list(item.root_idxs)
        if len(set(idxs)) != order.numel() or len(set(roots)) != order.numel():
            raise ValueError(f"{name} reads each channel more than once (a flatten)")
        size = int(getattr(m, moves[0][0]).shape[moves[0][1]])
        pos_of = dict(zip(roots, idxs))                          # root channel → position in this tensor's dim
        positions = torch.arange(size)
        for pos, root in zip(idxs, roots):
            positions[pos] = pos_of[int(order[root])]
        keys = [(name, t, d) for t, d in moves]
        if not out and name in gated and name not in own:       # a reader unit's gate reads the same input
            keys.append((f"gates.{gated[name]}.fc", "weight", 1))
        for key in keys:          # a norm or a depthwise conv is reached as a layer's output and as its input: once
            if key in edits and not torch.equal(edits[key], positions):
                raise ValueError(f"{name} is reached twice with different channel orders")
            edits[key] = positions
    return [(*key, positions) for key, positions in edits.items()]


def contiguous_groups(model: GatedModel, input_size: Sequence[int]) -> Contiguous:
    """Re-index, in place, the channels of every grouped unit of ``model`` so that each group's channels are
    contiguous (module doc); ``input_size`` (C, H, W) is what the dependency graph is traced at. The gates' maps become
    non-decreasing; with the same gate weights the model computes the same function."""
    import torch_pruning as tp  # deferred: only static twins, hybrids and this re-indexing need Torch-Pruning
    leaders = [u for u in model.units if not u.follows and model.gates[gate_key(u.name)].group_of is not None]
    if not leaders:
        return Contiguous()
    backbone = model.plain_backbone()
    dev = next(iter(backbone.parameters())).device
    with torch.enable_grad():                                    # Torch-Pruning traces through autograd
        dg = tp.DependencyGraph().build_dependency(backbone, example_inputs=torch.zeros(1, *input_size, device=dev))
    names = {m: n for n, m in backbone.named_modules()}
    gated = {u.name: gate_key(u.name) for u in model.units if not u.follows}
    result = Contiguous()
    for u in leaders:
        gate = model.gates[gate_key(u.name)]
        order = torch.sort(gate.group_of.cpu(), stable=True).indices
        if torch.equal(order, torch.arange(order.numel())):
            result.permuted[u.name] = order                      # already contiguous
            continue
        if u.kind not in ("conv", "mlp"):
            result.skipped[u.name] = f"a {u.kind} unit"
            continue
        module = backbone.get_submodule(u.name)
        fn = tp.prune_conv_out_channels if isinstance(module, nn.modules.conv._ConvNd) else tp.prune_linear_out_channels
        own = [u.name, *(f.name for f in model.units if f.follows == u.name)]
        try:
            group = dg.get_pruning_group(module, fn, idxs=list(range(order.numel())))
            edits = _unit_edits(dg, group, u.name, own, order, names, gated)
        except ValueError as e:
            result.skipped[u.name] = str(e)
            continue
        with torch.no_grad():
            for owner, tensor, dim, positions in edits:           # every edit found before any is applied
                target = model.get_submodule(owner if owner.startswith("gates.") else f"backbone.{owner}")
                t = getattr(target, tensor)
                t.copy_(t.index_select(dim, positions.to(t.device)))  # copy_ keeps the tensor (and its memory format)
            gate.group_of.copy_(gate.group_of[order.to(gate.group_of.device)])
        result.permuted[u.name] = order
    return result
