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
and keeps the fastest (``calibrate``). Weights are stored as (C_out, C_in, k, k) contiguous, so the output-row gather
is a memcpy per row; rows and columns together are one gather on the (C_out·C_in, k·k) view.

MLP units (fc1 → activation → fc2 on tokens) need no calibration: fc1 computes only the kept rows of its weight and
fc2 reads only the matching columns, the activation (and dropout) between them running on the narrow tensor. The
gather is paid once per sample and spread over all its tokens (197 for a ViT at 224 px), so it pays at batch 1.

Residual-stream units (``attach --residual-stream``): the block (``CompactBlock``) runs its gate on its input first,
so the convs feeding its sum (``CompactConv`` following the block's unit) compute only the kept filters; the sum is
masked after the block, and the next block's convs read only the kept channels (their ``in_out`` strategy).

Batch > 1: the union of the batch's masks is computed compactly, then each sample's own mask is applied, so the
result equals the masked model's; the saving shrinks as masks differ across samples (batch 1 is the target case).
Where the union keeps ≥ ``BATCH_DENSE_SHARE`` of a conv's filters (most layers at batch 32), the conv runs dense and
masks, in the dense layout: a compact union would compute as much and add the gathers and the scatter back.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..gating.gate import Gate, pool
from ..gating.macs import active_channels
from ..gating.model import GatedModel
from .fold import fold_bn

__all__ = ["CompactModel", "CompactConv", "CompactFc1", "CompactFc2", "CompactBlock", "Shared", "STRATEGIES"]

STRATEGIES = ("dense", "out", "in_out")
# Batch > 1: a conv whose union of the batch's masks keeps at least this share of its filters runs dense (then masks)
BATCH_DENSE_SHARE = 0.9


class Shared:
    """Per-forward state: masks decided so far (for downstream input sparsity), the channel indices of compact
    tensors passed between chained units, and optional forced masks."""

    def __init__(self) -> None:
        self.masks: Dict[str, torch.Tensor] = {}
        self.idx: Dict[str, Optional[torch.Tensor]] = {}      # None: the producer returned the dense layout
        self.forced: Optional[Mapping[str, torch.Tensor]] = None
        self.batch_dense_share = BATCH_DENSE_SHARE      # > 1: never (checking chains must see compact tensors pass)


def _empty_out(x: torch.Tensor, conv: "CompactConv", channels: int) -> torch.Tensor:
    """Zeros of the conv's output spatial size (conv arithmetic, as in nn.Conv2d's docs)."""
    hw = [(x.shape[2 + i] + 2 * conv.padding[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1
          for i in range(2)]
    return x.new_zeros(x.shape[0], channels, *hw)


class CompactConv(nn.Module):
    """conv (+ folded BN) of one gated unit, computing only active filters.

    ``compact_in`` names the unit whose compact output this conv reads (its input then holds only that unit's
    active channels, in ``shared.idx``); ``compact_out`` makes it return its own active channels only, for a
    chained consumer. Both are set by ``calibrate.make_compact`` for pairs it has verified.
    """

    def __init__(self, name: str, conv: nn.Conv2d, bn: Optional[nn.Module], gate: Optional[Gate], in_expr, shared: Shared,
                 follows: Optional[str] = None) -> None:
        super().__init__()
        self.name, self.in_expr, self.shared = name, in_expr, shared
        self.follows = follows             # a depthwise follower: no gate, the mask of this unit
        w, b = fold_bn(conv, bn)
        self.register_buffer("weight", w)                                  # (C_out, C_in/g, k, k), contiguous
        self.register_buffer("bias", b)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.kernel_size = conv.kernel_size
        self.padding_mode = conv.padding_mode
        self.out_channels, self.in_channels = conv.out_channels, conv.in_channels
        self.depthwise = conv.groups == conv.in_channels == conv.out_channels
        self.gate = gate
        self.strategy = "out" if (conv.groups == 1 or self.depthwise) else "dense"
        self.compact_in: Optional[str] = None
        self.compact_out = False
        # channel-count padding: pad_out[n] / pad_in[n] is how many output / input channels to compute when n are
        # active (≥ n; the extra ones are inactive, so zero). oneDNN's speed is far from monotone in the channel
        # count (at 7 px, 512→416 input channels can be slower than 512), so ``calibrate`` measures a table per layer.
        self.pad_out: Optional[List[int]] = None
        self.pad_in: Optional[List[int]] = None
        self.own_pad_out: Optional[List[int]] = None    # pad_out as measured, before a chained consumer overrides it

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, groups: int = 1) -> torch.Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, groups)

    def _rows_cols(self, out_idx: torch.Tensor, in_idx: torch.Tensor) -> torch.Tensor:
        """weight[out_idx][:, in_idx] in one gather: rows of the (C_out·C_in, k·k) view at o·C_in + i."""
        k = self.kernel_size
        flat = (out_idx[:, None] * self.in_channels + in_idx[None, :]).reshape(-1)
        return self.weight.view(-1, k[0] * k[1]).index_select(0, flat).view(out_idx.numel(), in_idx.numel(), *k)

    @staticmethod
    def _indices(active: torch.Tensor, pad: Optional[List[int]]) -> Tuple[torch.Tensor, int]:
        """Indices of the active channels, then inactive ones up to pad[n]; and n, the number active."""
        idx = active.nonzero().squeeze(1)
        n = int(idx.numel())
        if pad is not None and pad[n] > n:
            idx = torch.cat([idx, (~active).nonzero().squeeze(1)[:pad[n] - n]])
        return idx, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sh = self.shared
        B = x.shape[0]
        in_idx: Optional[torch.Tensor] = None
        if self.compact_in is not None:        # x holds only the producer's active channels (None: all, dense layout)
            in_idx = sh.idx[self.compact_in]
        if self.follows is not None:
            mask = sh.masks[self.follows]
        else:
            if in_idx is not None:
                pooled = x.new_zeros(B, self.in_channels)
                pooled.index_copy_(1, in_idx, x.mean(dim=(2, 3)))
                logits = self.gate.from_pooled(pooled)  # = gate(dense x): the missing channels are all zero
            else:
                logits = self.gate(x)
            mask = sh.forced[self.name] if sh.forced is not None else logits > 0
        sh.masks[self.name] = mask
        any_out = mask.any(0) if B > 1 else mask[0]
        # a batch whose union of masks keeps nearly every filter: the dense conv and each sample's mask, in the dense
        # layout (a compact union would compute as much and add the gathers and the scatter back)
        union_dense = B > 1 and int(any_out.sum()) >= sh.batch_dense_share * self.out_channels
        dense = self.strategy == "dense" or union_dense
        if in_idx is not None and dense:       # back to the dense layout, then as unchained
            dense_x = x.new_zeros(B, self.in_channels, x.shape[2], x.shape[3])
            x, in_idx = dense_x.index_copy_(1, in_idx, x), None
        if dense or self.padding_mode != "zeros":
            y = self._conv(x, self.weight, self.bias, self.groups)
            if union_dense and self.compact_out:     # the consumer reads the dense layout
                sh.idx[self.name] = None
            if not self.compact_out or union_dense:
                return y.mul_(mask[:, :, None, None].to(y.dtype))     # y is the conv's own new tensor
            out_idx, n_active = self._indices(any_out, self.pad_out)
            y = y.index_select(1, out_idx)
        else:
            out_idx, n_active = self._indices(any_out, self.pad_out)
            if out_idx.numel() == 0:
                y = _empty_out(x, self, 0)
            elif self.depthwise:                   # filter j reads channel j only
                y = self._conv(x.index_select(1, out_idx), self.weight.index_select(0, out_idx),
                               self.bias.index_select(0, out_idx), int(out_idx.numel()))
            elif in_idx is not None:               # chained: the input is already compact
                y = self._conv_in_out(x, out_idx, in_idx)
            elif self.strategy == "in_out":
                a_in = active_channels(self.in_expr, sh.masks, B)
                idx = None if a_in is None else self._indices(a_in.any(0) if B > 1 else a_in[0], self.pad_in)[0]
                if idx is None or idx.numel() == self.in_channels:
                    y = self._conv(x, self.weight.index_select(0, out_idx), self.bias.index_select(0, out_idx))
                else:
                    y = self._conv_in_out(x.index_select(1, idx), out_idx, idx)
            else:
                y = self._conv(x, self.weight.index_select(0, out_idx), self.bias.index_select(0, out_idx))
        if B > 1:                                  # the union was computed: apply each sample's own mask
            y = y * mask.index_select(1, out_idx)[:, :, None, None].to(y.dtype)
        elif out_idx.numel() > n_active:           # padding channels were computed but are inactive: zero
            y[:, n_active:].zero_()
        if self.compact_out:
            sh.idx[self.name] = out_idx
            return y
        out = y.new_zeros(B, self.out_channels, y.shape[2], y.shape[3])
        return out.index_copy_(1, out_idx, y)

    def _conv_in_out(self, xs: torch.Tensor, out_idx: torch.Tensor, in_idx: torch.Tensor) -> torch.Tensor:
        b = self.bias.index_select(0, out_idx)
        if in_idx.numel() == 0:                    # nothing to read: the output is the bias alone
            return _empty_out(xs, self, out_idx.numel()) + b[None, :, None, None]
        return self._conv(xs, self._rows_cols(out_idx, in_idx), b)


class CompactFc1(nn.Module):
    """fc1 of a gated MLP unit: the gate (pooled over tokens) picks the hidden units, and only their rows of the
    weight run. Returns the narrow (..., k) tensor; its indices go to ``shared.idx`` for fc2.

    A gated (GLU) MLP: ``halves=2`` for one fc1 chunked into value and gate halves (rows j and hidden + j run), or
    two of these on the same input (SwiGLU's up and gate projections, the second with ``own_mask=False``), sharing
    the gate: the first of them to run decides for both, and fc2 reads their narrow product."""

    def __init__(self, name: str, fc1: nn.Linear, gate: Gate, shared: Shared, *, halves: int = 1,
                 own_mask: bool = True) -> None:
        super().__init__()
        self.name, self.gate, self.shared, self.halves, self.own_mask = name, gate, shared, halves, own_mask
        self.register_buffer("weight", fc1.weight.detach().clone().contiguous())        # (hidden, C_in): a row per unit
        b = fc1.bias.detach().clone() if fc1.bias is not None else fc1.weight.new_zeros(fc1.out_features)
        self.register_buffer("bias", b)
        self.out_channels = fc1.out_features // halves
        self.strategy = "mlp"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sh = self.shared
        if self.name not in sh.idx:
            logits = self.gate.from_pooled(pool(x, True))
            mask = sh.forced[self.name] if sh.forced is not None and self.name in sh.forced else logits > 0
            sh.masks[self.name] = mask
            sh.idx[self.name] = (mask.any(0) if mask.shape[0] > 1 else mask[0]).nonzero().squeeze(1)
        mask, idx = sh.masks[self.name], sh.idx[self.name]
        rows = torch.cat([idx + h * self.out_channels for h in range(self.halves)]) if self.halves > 1 else idx
        y = F.linear(x, self.weight.index_select(0, rows), self.bias.index_select(0, rows))
        if mask.shape[0] > 1 and self.own_mask:    # the union was computed: apply each sample's own mask
            m = mask.index_select(1, idx).repeat(1, self.halves)
            y = y * m.view(mask.shape[0], *([1] * (y.dim() - 2)), -1).to(y.dtype)
        return y


class CompactFc2(nn.Module):
    """fc2 of a gated MLP unit: reads the narrow tensor of its fc1 and only the matching weight columns, stored
    transposed (hidden, C_out) so that the gather copies contiguous rows."""

    def __init__(self, producer: str, fc2: nn.Linear, shared: Shared) -> None:
        super().__init__()
        self.producer, self.shared = producer, shared
        self.register_buffer("weight_t", fc2.weight.detach().t().contiguous())
        self.register_buffer("bias", fc2.bias.detach().clone() if fc2.bias is not None else None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w = self.weight_t.index_select(0, self.shared.idx[self.producer])       # (k, C_out)
        return F.linear(h, w.t(), self.bias)


class CompactBlock(nn.Module):
    """A residual block whose output is a residual-stream unit: the gate runs on the block's input and decides its
    kept output channels before the block runs, so the convs feeding its sum (``CompactConv`` following this unit)
    compute only those filters; the sum is then masked, which zeroes the identity's channels the mask drops."""

    def __init__(self, name: str, block: nn.Module, gate: Gate, shared: Shared, out_channels: int) -> None:
        super().__init__()
        self.name, self.block, self.gate, self.shared, self.out_channels = name, block, gate, shared, out_channels
        self.strategy = "stream"

    @property
    def weight(self) -> torch.Tensor:        # where the unit lives (CompactModel reads a unit's device from it)
        return self.gate.fc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sh = self.shared
        mask = sh.forced[self.name] if sh.forced is not None else self.gate(x) > 0
        sh.masks[self.name] = mask
        y = self.block(x)
        return y.mul_(mask[:, :, None, None].to(y.dtype))      # the block's own new tensor (a sum, an activation)


class CompactModel(nn.Module):
    """A GatedModel's backbone with compact gated convs. Inference only (eval mode, no gradients)."""

    def __init__(self, backbone: nn.Module, units: Dict[str, nn.Module], shared: Shared, source: GatedModel) -> None:
        super().__init__()
        self.backbone = backbone
        self.compact_units = units
        self._shared = shared
        self.meta, self.plan = source.meta, source.plan

    @torch.no_grad()
    def forward(self, x: torch.Tensor, masks: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
        """``masks`` forces decisions (e.g. oracle masks replayed for a benchmark); the gates still run."""
        self._shared.masks, self._shared.idx = {}, {}
        self._shared.forced = masks
        try:
            return self.backbone(x)
        finally:
            self._shared.forced = None

    @property
    def strategies(self) -> Dict[str, str]:
        return {n: u.strategy for n, u in self.compact_units.items()}

    @property
    def chains(self) -> Dict[str, str]:
        """producer -> consumer pairs that pass compact tensors."""
        return {u.compact_in: n for n, u in self._convs().items() if u.compact_in is not None}

    def _convs(self) -> Dict[str, CompactConv]:
        return {n: u for n, u in self.compact_units.items() if isinstance(u, CompactConv)}
