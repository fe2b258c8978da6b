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

MLP units (fc1 → activation → fc2 on tokens) need no calibration: fc1 computes only the kept rows of its weight and
fc2 reads only the matching columns, the activation (and dropout) between them running on the narrow tensor. The
gather is paid once per sample and spread over all its tokens (197 for a ViT at 224 px), so it pays at batch 1.

Batch > 1: the union of the batch's masks is computed compactly, then each sample's own mask is applied, so the
result equals the masked model's; the saving shrinks as masks differ across samples (batch 1 is the target case).
"""
from __future__ import annotations

import copy
import time
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..gating.gate import Gate, gate_key, pool
from ..gating.macs import active_channels
from ..gating.model import GatedModel
from .fold import fold_bn, norm_rest, replace_module

__all__ = ["CompactModel", "CompactConv", "CompactFc1", "CompactFc2", "make_compact", "STRATEGIES"]

STRATEGIES = ("dense", "out", "in_out")


class _Shared:
    """Per-forward state: masks decided so far (for downstream input sparsity), the channel indices of compact
    tensors passed between chained units, and optional forced masks."""

    def __init__(self) -> None:
        self.masks: Dict[str, torch.Tensor] = {}
        self.idx: Dict[str, torch.Tensor] = {}
        self.forced: Optional[Mapping[str, torch.Tensor]] = None


def _empty_out(x: torch.Tensor, conv: "CompactConv", channels: int) -> torch.Tensor:
    """Zeros of the conv's output spatial size (conv arithmetic, as in nn.Conv2d's docs)."""
    hw = [(x.shape[2 + i] + 2 * conv.padding[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1
          for i in range(2)]
    return x.new_zeros(x.shape[0], channels, *hw)


class CompactConv(nn.Module):
    """conv (+ folded BN) of one gated unit, computing only active filters.

    ``compact_in`` names the unit whose compact output this conv reads (its input then holds only that unit's
    active channels, in ``shared.idx``); ``compact_out`` makes it return its own active channels only, for a
    chained consumer. Both are set by ``make_compact`` for pairs it has verified.
    """

    def __init__(self, name: str, conv: nn.Conv2d, bn: Optional[nn.Module], gate: Gate, in_expr, shared: _Shared) -> None:
        super().__init__()
        self.name, self.in_expr, self.shared = name, in_expr, shared
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
        if self.compact_in is not None:        # x holds only the producer's active channels
            in_idx = sh.idx[self.compact_in]
            pooled = x.new_zeros(B, self.in_channels)
            pooled.index_copy_(1, in_idx, x.mean(dim=(2, 3)))
            logits = self.gate.fc(pooled)      # = gate(dense x): the missing channels are all zero
        else:
            logits = self.gate(x)
        mask = sh.forced[self.name] if sh.forced is not None else logits > 0
        sh.masks[self.name] = mask
        any_out = mask.any(0) if B > 1 else mask[0]
        if in_idx is not None and self.strategy == "dense":      # back to the dense layout, then as unchained
            dense_x = x.new_zeros(B, self.in_channels, x.shape[2], x.shape[3])
            x, in_idx = dense_x.index_copy_(1, in_idx, x), None
        if self.strategy == "dense" or self.padding_mode != "zeros":
            y = self._conv(x, self.weight, self.bias, self.groups)
            if not self.compact_out:
                return y * mask[:, :, None, None].to(y.dtype)
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

    def __init__(self, name: str, fc1: nn.Linear, gate: Gate, shared: _Shared, *, halves: int = 1,
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
            logits = self.gate.fc(pool(x, True))
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

    def __init__(self, producer: str, fc2: nn.Linear, shared: _Shared) -> None:
        super().__init__()
        self.producer, self.shared = producer, shared
        self.register_buffer("weight_t", fc2.weight.detach().t().contiguous())
        self.register_buffer("bias", fc2.bias.detach().clone() if fc2.bias is not None else None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w = self.weight_t.index_select(0, self.shared.idx[self.producer])       # (k, C_out)
        return F.linear(h, w.t(), self.bias)


class CompactModel(nn.Module):
    """A GatedModel's backbone with compact gated convs. Inference only (eval mode, no gradients)."""

    def __init__(self, backbone: nn.Module, units: Dict[str, nn.Module], shared: _Shared, source: GatedModel) -> None:
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


def make_compact(gated: GatedModel, *, calibrate: bool = True, input_size: Optional[Tuple[int, int, int]] = None,
                 keep: float = 0.7, reps: int = 15, chain: bool = True) -> CompactModel:
    """Compact copy of ``gated``. ``chain`` passes compact tensors between units where the traced plan says a
    unit reads exactly another unit's output (conv1 → conv2 in a ResNet block), after checking each such pair on
    random masks. ``calibrate`` times the strategies of every gated conv at batch 1, in context, with ``keep``
    of the filters active, and keeps the fastest."""
    backbone = gated.plain_backbone()       # CompactConv gates itself: no GatedModel hooks
    gates = copy.deepcopy(gated.gates)
    shared = _Shared()
    units: Dict[str, nn.Module] = {}
    mods = dict(backbone.named_modules())
    for u in gated.units:
        if u.kind in ("mlp", "glu"):
            gate, fc1 = gates[gate_key(u.name)], mods[u.name]
            units[u.name] = CompactFc1(u.name, fc1, gate, shared, halves=fc1.out_features // u.out_channels)
            replace_module(backbone, u.name, units[u.name])
            if u.partner:
                replace_module(backbone, u.partner, CompactFc1(u.name, mods[u.partner], gate, shared, own_mask=False))
            replace_module(backbone, u.reader, CompactFc2(u.name, mods[u.reader], shared))
            continue
        conv = mods[u.name]
        norm = mods[u.end] if u.end != u.name else None
        cu = CompactConv(u.name, conv, norm, gates[gate_key(u.name)], u.in_expr, shared)
        replace_module(backbone, u.name, cu)
        if norm is not None:      # folded into the conv
            replace_module(backbone, u.end, norm_rest(norm))
        units[u.name] = cu
    model = CompactModel(backbone, units, shared, gated).eval()
    size = input_size or tuple(gated.plan.input_size)
    if chain:
        _chain(model, size)
    if calibrate:
        _calibrate(model, size, keep, reps)
        # a consumer that runs dense would only scatter the compact tensor back: chaining it costs, never saves
        _set_chain(model, [(p, c) for p, c in model.chains.items() if model.compact_units[c].strategy == "dense"], False)
    return model


def _device(model: CompactModel) -> torch.device:
    return next(iter(model.compact_units.values())).weight.device


def _random_masks(model: CompactModel, batch: int, keep: float, g: torch.Generator) -> Dict[str, torch.Tensor]:
    return {n: (torch.rand(batch, u.out_channels, generator=g) < keep).to(u.weight.device) for n, u in model.compact_units.items()}


def _set_chain(model: CompactModel, pairs, on: bool) -> None:
    for producer, consumer in pairs:
        model.compact_units[producer].compact_out = on
        model.compact_units[consumer].compact_in = producer if on else None
        if not on:      # it padded for its consumer's input: back to its own table (None before calibration)
            model.compact_units[producer].pad_out = model.compact_units[producer].own_pad_out


@torch.no_grad()
def _chain(model: CompactModel, input_size: Tuple[int, ...]) -> None:
    """Chain each producer → consumer pair whose consumer reads exactly the producer's output (plan: in_expr
    ["unit", producer, C] with C the producer's width) and is an ungrouped conv; keep the pairs for which the
    output on random masks (batch 2, samples differ) is unchanged. A hidden second reader of the producer's
    output would see a narrower tensor and fail or differ, so such a pair is dropped."""
    us = model._convs()
    pairs = [(u.in_expr[1], n) for n, u in us.items()
             if u.in_expr and u.in_expr[0] == "unit" and u.in_expr[1] in us and u.groups == 1 and u.padding_mode == "zeros"
             and us[u.in_expr[1]].out_channels == u.in_channels and int(u.in_expr[2]) == u.in_channels]
    if not pairs:
        return
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *input_size, generator=g).to(_device(model))
    masks = _random_masks(model, 2, 0.6, g)
    ref = model(x, masks)
    tol = 1e-5 * float(ref.abs().max()) + 1e-6

    def same() -> bool:
        try:
            return bool((model(x, masks) - ref).abs().max() <= tol)
        except Exception:          # e.g. a shape mismatch in a reader the plan did not see
            return False

    _set_chain(model, pairs, True)
    if same():
        return
    _set_chain(model, pairs, False)
    good = []
    for p in pairs:
        _set_chain(model, [p], True)
        if same():
            good.append(p)
        _set_chain(model, [p], False)
    _set_chain(model, good, True)


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
def _calibrate(model: CompactModel, input_size: Tuple[int, ...], keep: float, reps: int) -> None:
    """Per unit, time each strategy on the input it really gets (dense or compact) in one batch-1 forward with
    random masks at ``keep``, and keep the fastest (the simpler one unless another is clearly faster)."""
    g = torch.Generator().manual_seed(0)
    masks = _random_masks(model, 1, keep, g)
    seen: Dict[str, Tuple[torch.Tensor, Dict[str, torch.Tensor]]] = {}
    handles = [u.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, (a[0].clone(), dict(model._shared.idx))))
               for n, u in model._convs().items()]
    try:
        model(torch.randn(1, *input_size, generator=g).to(_device(model)), masks)
    finally:
        for h in handles:
            h.remove()
    _pad_tables(model, {n: v[0] for n, v in seen.items()}, max(3, reps // 2))
    for name, u in model._convs().items():
        if name not in seen or not (u.groups == 1 or u.depthwise):
            continue
        x, idx = seen[name]
        if u.depthwise or u.compact_in is not None:
            candidates = ("dense", "out")   # chained: "out" reads the compact input, i.e. rows and columns
        else:
            candidates = STRATEGIES
        best, best_t = "dense", None
        for strategy in candidates:
            u.strategy = strategy

            def run():
                model._shared.masks, model._shared.idx, model._shared.forced = dict(masks), dict(idx), masks
                u(x)
            t = _time(run, reps)
            if best_t is None or t < best_t * 0.97:   # prefer the simpler strategy unless clearly faster
                best, best_t = strategy, t
        u.strategy = best
    model._shared.forced = None


def _grid(c: int) -> List[int]:
    """Candidate channel counts: multiples of ~c/16 (at least 8), and c itself."""
    q = max(8, -(-c // 16 // 8) * 8)
    return sorted({*range(q, c, q), c})


def _lookup(times: Dict[int, float], c: int) -> List[int]:
    """pad[n] = the fastest measured count m ≥ n (pad[0] = 0: nothing to compute)."""
    pad = [0] * (c + 1)
    best, best_t = c, times[c]
    for n in range(c, 0, -1):          # walking down, the best m ≥ n only improves when a grid point is passed
        if n in times and times[n] <= best_t:
            best, best_t = n, times[n]
        pad[n] = best
    return pad


@torch.no_grad()
def _pad_tables(model: CompactModel, inputs: Dict[str, torch.Tensor], reps: int) -> None:
    """Per ungrouped gated conv, time the conv at batch 1 on its real spatial size for each output count (all
    inputs read) and each input count (¾ of the outputs computed), and set pad_out / pad_in from the fastest
    count at or above each n. A chained producer pads to what its consumer reads fastest."""
    g = torch.Generator().manual_seed(1)
    for name, u in model._convs().items():
        if name not in inputs or u.groups != 1:
            continue
        h, w = inputs[name].shape[2:]
        k = u.kernel_size

        def t(n_in: int, n_out: int) -> float:
            x = torch.randn(1, n_in, h, w, generator=g).to(u.weight.device)
            wt = torch.randn(n_out, n_in, *k, generator=g).to(u.weight.device)
            return _time(lambda: u._conv(x, wt, None), reps)
        typical = max(1, round(0.75 * u.out_channels))
        u.pad_out = u.own_pad_out = _lookup({m: t(u.in_channels, m) for m in _grid(u.out_channels)}, u.out_channels)
        u.pad_in = _lookup({m: t(m, typical) for m in _grid(u.in_channels)}, u.in_channels)
    for producer, consumer in model.chains.items():
        model.compact_units[producer].pad_out = model.compact_units[consumer].pad_in
