"""Folding a gated unit's BatchNorm into its conv: what the compact path computes with, and the fair dense
baseline for timing it."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..gating.model import GatedModel

__all__ = ["fold_bn", "replace_module", "folded_backbone"]


def fold_bn(conv: nn.Conv2d, bn: Optional[nn.Module]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(w', b') with w' = w·γ/σ and b' = β − μ·γ/σ + b·γ/σ, σ = sqrt(running_var + eps); (w, b) without a norm."""
    w = conv.weight.detach().float()
    b = conv.bias.detach().float() if conv.bias is not None else torch.zeros(conv.out_channels, device=w.device)
    if bn is None:
        return w.contiguous(), b
    scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
    return (w * scale[:, None, None, None]).contiguous(), (bn.bias.detach().float() - bn.running_mean.float() * scale) + b * scale


def replace_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` (dotted) inside ``root``."""
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def norm_rest(norm: nn.Module) -> nn.Module:
    """What stays of a folded norm: a timm norm+act module keeps its dropout and activation."""
    rest = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None)) if m is not None]
    return nn.Sequential(*rest) if rest else nn.Identity()


def folded_backbone(model: GatedModel) -> nn.Module:
    """The source network with the norm of every conv → norm pair the trace found folded into the conv: the gated
    units' (as the compact path does) and the others' (a static twin's, ungated layers'), so the dense baseline is the
    fastest plain network, not a handicapped one."""
    net = model.plain_backbone()
    pairs = [(u.name, u.end) for u in model.plan.units if u.kind == "conv"]     # an MLP unit's fc1 has no norm
    # a residual-stream unit is a block: the convs feeding its sum, with their norms
    pairs += [p for u in model.plan.units if u.kind == "stream" for p in zip(u.computes, u.computes_ends)]
    for name, end in pairs:
        conv = net.get_submodule(name)
        norm = net.get_submodule(end) if end != name else None
        w, b = fold_bn(conv, norm)
        with torch.no_grad():
            conv.weight.copy_(w)
            if conv.bias is None:
                conv.bias = nn.Parameter(b)
            else:
                conv.bias.copy_(b)
        if norm is not None:
            replace_module(net, end, norm_rest(norm))
    return net
