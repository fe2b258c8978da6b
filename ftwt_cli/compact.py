"""The compact execution path: each gated conv computes only the filters its gate keeps.

Built on a deep copy of a GatedModel (the caller's model is untouched). For every gated unit:
* its BatchNorm is folded into the conv (w' = w·γ/σ, b' = β − μ·γ/σ), so BN runs on the compact tensor for free;
* the gate runs first, on the conv's input (GAP → Linear), and decides the active output channels;
* the conv then computes those rows only, and — where its input is structurally sparse — reads only the active
  input channels, as the sparsity expression of the traced plan says; depthwise convs read the matching channels;
* the compact result is scattered into a zero tensor, because the next module (a residual add, a concat, an
  activation) expects the dense layout; f(0)=0 keeps the zeros zero.

Which of dense / output-only / input-and-output runs fastest depends on the layer: at batch 1 on a CPU, slicing a
64-channel 3×3 conv at 56 px is faster than its dense kernel, while at 7–14 px with 256–512 channels gathering
weights costs more than it saves. So ``calibrate`` times each strategy per layer once, at a realistic keep ratio,
and keeps the fastest. Weights are stored as (C_out, C_in, k, k) contiguous, so the output-row gather is a
memcpy per row, and also as (C_in, C_out, k, k) for the input gather.

Batch > 1: the union of the batch's masks is computed compactly, then each sample's own mask is applied, so the
result equals the masked model's; the saving shrinks as masks differ across samples (batch 1 is the target case).
"""
from __future__ import annotations

import copy
import time
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gating import GatedModel, gate_key
from .macs import active_channels

__all__ = ["CompactModel", "CompactConv", "make_compact", "plain_copy", "STRATEGIES"]

STRATEGIES = ("dense", "out", "in_out")


def _fold_bn(conv: nn.Conv2d, bn: Optional[nn.Module]) -> Tuple[torch.Tensor, torch.Tensor]:
    w = conv.weight.detach().float()
    b = conv.bias.detach().float() if conv.bias is not None else torch.zeros(conv.out_channels)
    if bn is None:
        return w.contiguous(), b
    scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
    return (w * scale[:, None, None, None]).contiguous(), (bn.bias.detach().float() - bn.running_mean.float() * scale) + b * scale


class _Shared:
    """Masks decided so far in this forward (for downstream input sparsity), and optional forced masks."""

    def __init__(self) -> None:
        self.masks: Dict[str, torch.Tensor] = {}
        self.forced: Optional[Mapping[str, torch.Tensor]] = None


class CompactConv(nn.Module):
    """conv (+ folded BN) of one gated unit, computing only active filters."""

    def __init__(self, name: str, conv: nn.Conv2d, bn: Optional[nn.Module], gate: nn.Module, in_expr, shared: _Shared) -> None:
        super().__init__()
        self.name, self.in_expr, self.shared = name, in_expr, shared
        w, b = _fold_bn(conv, bn)
        self.register_buffer("weight", w)                                  # (C_out, C_in/g, k, k)
        self.register_buffer("weight_in_major", w.transpose(0, 1).contiguous() if conv.groups == 1 else w)
        self.register_buffer("bias", b)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        self.out_channels, self.in_channels = conv.out_channels, conv.in_channels
        self.depthwise = conv.groups == conv.in_channels == conv.out_channels
        self.gate = gate
        self.strategy = "out" if (conv.groups == 1 or self.depthwise) else "dense"

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sh = self.shared
        logits = self.gate(x)
        mask = sh.forced[self.name] if sh.forced is not None else logits > 0
        sh.masks[self.name] = mask
        B = x.shape[0]
        if self.strategy == "dense" or self.padding_mode != "zeros":
            return self._dense(x) * mask[:, :, None, None].to(x.dtype)
        any_out = mask.any(0) if B > 1 else mask[0]
        out_idx = any_out.nonzero().squeeze(1)
        if self.depthwise:                       # filter j reads channel j only
            xs = x.index_select(1, out_idx)
            y = F.conv2d(xs, self.weight.index_select(0, out_idx), self.bias.index_select(0, out_idx),
                         self.stride, self.padding, self.dilation, int(out_idx.numel()))
        elif self.strategy == "in_out":
            a_in = active_channels(self.in_expr, sh.masks, B)
            if a_in is None:
                in_idx = None
            else:
                in_idx = (a_in.any(0) if B > 1 else a_in[0]).nonzero().squeeze(1)
            if in_idx is None or in_idx.numel() == self.in_channels:
                w = self.weight.index_select(0, out_idx)
                xs = x
            else:
                w = self.weight_in_major.index_select(0, in_idx).index_select(1, out_idx).transpose(0, 1)
                xs = x.index_select(1, in_idx)
            y = F.conv2d(xs, w, self.bias.index_select(0, out_idx), self.stride, self.padding, self.dilation)
        else:
            y = F.conv2d(x, self.weight.index_select(0, out_idx), self.bias.index_select(0, out_idx),
                         self.stride, self.padding, self.dilation)
        out = y.new_zeros(B, self.out_channels, y.shape[2], y.shape[3])
        out.index_copy_(1, out_idx, y)
        if B > 1:
            out = out * mask[:, :, None, None].to(out.dtype)
        return out


class CompactModel(nn.Module):
    """A GatedModel's backbone with compact gated convs. Inference only (eval mode, no gradients)."""

    def __init__(self, backbone: nn.Module, units: Dict[str, CompactConv], shared: _Shared, source: GatedModel) -> None:
        super().__init__()
        self.backbone = backbone
        self.compact_units = units
        self._shared = shared
        self.meta, self.data_config, self.plan = source.meta, source.data_config, source.plan

    @torch.no_grad()
    def forward(self, x: torch.Tensor, masks: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
        """``masks`` forces decisions (e.g. oracle masks replayed for a benchmark); the gates still run."""
        self._shared.masks = {}
        self._shared.forced = masks
        try:
            return self.backbone(x)
        finally:
            self._shared.forced = None

    @property
    def strategies(self) -> Dict[str, str]:
        return {n: u.strategy for n, u in self.compact_units.items()}


def strip_hooks(module: nn.Module) -> nn.Module:
    for m in module.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return module


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy without any forward hooks (GatedModel's hooks travel with deepcopy)."""
    return strip_hooks(copy.deepcopy(module).eval())


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def make_compact(gated: GatedModel, *, calibrate: bool = True, input_size: Optional[Tuple[int, int, int]] = None,
                 keep: float = 0.7, reps: int = 15) -> CompactModel:
    """Compact copy of ``gated``. ``calibrate`` times the strategies of every gated conv at batch 1 with
    ``keep`` of its input and output channels active, and keeps the fastest."""
    src = copy.deepcopy(gated).eval()
    backbone = strip_hooks(src.backbone)    # CompactConv gates itself: no GatedModel hooks
    shared = _Shared()
    units: Dict[str, CompactConv] = {}
    mods = dict(backbone.named_modules())
    for u in src.units:
        conv = mods[u.name]
        norm = mods[u.end] if u.end != u.name else None
        cu = CompactConv(u.name, conv, norm, src.gates[gate_key(u.name)], u.in_expr, shared)
        _set(backbone, u.name, cu)
        if norm is not None:
            # the norm is folded into the conv; a timm norm+act module keeps its activation (and dropout)
            rest = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None)) if m is not None]
            _set(backbone, u.end, nn.Sequential(*rest) if rest else nn.Identity())
        units[u.name] = cu
    model = CompactModel(backbone, units, shared, gated).eval()
    if calibrate:
        _calibrate(model, input_size or tuple(gated.plan.input_size), keep, reps)
    return model


def _time(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


@torch.no_grad()
def _calibrate(model: CompactModel, input_size: Tuple[int, int, int], keep: float, reps: int) -> None:
    inputs: Dict[str, torch.Tensor] = {}
    handles = [u.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].clone()))
               for n, u in model.compact_units.items()]
    try:
        model(torch.randn(1, *input_size))
    finally:
        for h in handles:
            h.remove()
    g = torch.Generator().manual_seed(0)
    for name, u in model.compact_units.items():
        if name not in inputs or not (u.groups == 1 or u.depthwise):
            continue
        x = inputs[name]
        out_mask = torch.rand(1, u.out_channels, generator=g) < keep
        in_mask = torch.rand(1, u.in_channels, generator=g) < keep
        x = x * in_mask[:, :, None, None]
        # the masks this layer's input expression refers to: give every referenced unit a keep-ratio mask
        fake = {n: torch.rand(1, model.compact_units[n].out_channels, generator=g) < keep for n in model.compact_units}
        best, best_t = "dense", None
        for strategy in (("dense", "out", "in_out") if not u.depthwise else ("dense", "out")):
            u.strategy = strategy

            def run():
                model._shared.masks = dict(fake)
                model._shared.forced = {name: out_mask}
                u(x)
            t = _time(run, reps)
            if best_t is None or t < best_t * 0.97:   # prefer the simpler strategy unless clearly faster
                best, best_t = strategy, t
        u.strategy = best
    model._shared.forced = None
