"""Building the compact model (``make_compact``): every gated unit replaced by its compact module, chained where
a unit reads exactly another's output and a check on random masks agrees, and each conv's strategy and channel-count
padding timed in place at batch 1 (``_calibrate``), keeping the fastest.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..gating.gate import gate_key
from ..gating.model import GatedModel
from .clock import median_ms
from .compact import STRATEGIES, CompactBlock, CompactConv, CompactFc1, CompactFc2, CompactModel, Shared
from .fold import norm_rest, replace_module

__all__ = ["make_compact"]


def make_compact(gated: GatedModel, *, calibrate: bool = True, input_size: Optional[Tuple[int, int, int]] = None,
                 keep: Union[float, Mapping[str, float]] = 0.7, reps: int = 15, chain: bool = True) -> CompactModel:
    """Compact copy of ``gated``. ``chain`` passes compact tensors between units where the traced plan says a
    unit reads exactly another unit's output (conv1 → conv2 in a ResNet block), after checking each such pair on
    random masks. ``calibrate`` times the strategies of every gated conv at batch 1, in context, with ``keep``
    of the filters active (one share, or each unit's own: the keep ratios the gates really give, since a layer that
    keeps a quarter of its filters is fastest compact where one that keeps 0.7 is not), and keeps the fastest."""
    backbone = gated.plain_backbone()       # CompactConv gates itself: no GatedModel hooks
    gates = copy.deepcopy(gated.gates)
    shared = Shared()
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
        if u.kind == "stream":      # the block: its gate first, then the convs feeding its sum compute the kept rows
            for name, end in zip(u.computes, u.computes_ends):
                norm = mods[end] if end != name else None
                units[name] = CompactConv(name, mods[name], norm, None, _op_expr(gated, name), shared, follows=u.name)
                replace_module(backbone, name, units[name])
                if norm is not None:
                    replace_module(backbone, end, norm_rest(norm))
            units[u.name] = CompactBlock(u.name, mods[u.name], gates[gate_key(u.name)], shared, u.out_channels)
            replace_module(backbone, u.name, units[u.name])
            continue
        conv = mods[u.name]
        norm = mods[u.end] if u.end != u.name else None
        cu = CompactConv(u.name, conv, norm, gates[gate_key(u.name)] if not u.follows else None, u.in_expr, shared,
                         follows=u.follows)
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


def _op_expr(gated: GatedModel, name: str):
    """The sparsity expression of the tensor conv ``name`` reads (the plan's MacOp)."""
    return next(op.in_expr for op in gated.plan.ops if op.name == name)


def _device(model: CompactModel) -> torch.device:
    return next(iter(model.compact_units.values())).weight.device


def _random_masks(model: CompactModel, batch: int, keep: Union[float, Mapping[str, float]],
                  g: torch.Generator) -> Dict[str, torch.Tensor]:
    """(batch, C) random masks keeping ``keep`` of each unit's channels (a unit missing from a mapping: 0.7)."""
    share = (lambda n: keep.get(n, 0.7)) if isinstance(keep, Mapping) else (lambda n: keep)
    return {n: (torch.rand(batch, u.out_channels, generator=g) < share(n)).to(u.weight.device)
            for n, u in model.compact_units.items()}


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
    # a producer read by two compact convs (a ResNet-D stem read by a block's conv1 and its shortcut conv) stays
    # dense: a chain is one producer → one consumer (``CompactModel.chains``)
    readers = [p for p, _ in pairs]
    pairs = [(p, c) for p, c in pairs if readers.count(p) == 1]
    if not pairs:
        return
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *input_size, generator=g).to(_device(model))
    masks = _random_masks(model, 2, 0.6, g)
    ref = model(x, masks)
    share, model._shared.batch_dense_share = model._shared.batch_dense_share, 2.0   # every pair really passes compact
    try:
        _check_chains(model, pairs, x, masks, ref)
    finally:
        model._shared.batch_dense_share = share


def _check_chains(model: CompactModel, pairs, x: torch.Tensor, masks, ref: torch.Tensor) -> None:
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


@torch.no_grad()
def _calibrate(model: CompactModel, input_size: Tuple[int, ...], keep: Union[float, Mapping[str, float]],
               reps: int) -> None:
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
            t = median_ms(run, 3, reps, u.weight.device)
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
            return median_ms(lambda: u._conv(x, wt, None), 3, reps, u.weight.device)
        typical = max(1, round(0.75 * u.out_channels))
        u.pad_out = u.own_pad_out = _lookup({m: t(u.in_channels, m) for m in _grid(u.out_channels)}, u.out_channels)
        u.pad_in = _lookup({m: t(m, typical) for m in _grid(u.in_channels)}, u.in_channels)
    for producer, consumer in model.chains.items():
        model.compact_units[producer].pad_out = model.compact_units[consumer].pad_in
