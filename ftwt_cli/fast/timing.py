"""Latency of dense, gated-masked and gated-compact execution, measured in one process, with MACs beside it.

Each variant runs ``warmup`` times, then ``reps`` timed forwards on the same input; we report the median (p50)
and p90 in milliseconds. The gated variants use the gates' decisions, or replay fixed masks (``masks``, e.g.
oracle masks at some r) while still running their gates, so the gate cost is always in the timing.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch

from ..gating.model import GatedModel
from .calibrate import make_compact
from .clock import time_ms
from .fold import folded_backbone

__all__ = ["BenchRow", "BenchReport", "bench", "oracle_masks"]


@dataclass(frozen=True)
class BenchRow:
    variant: str          # "dense" | "dense-folded" (BN folded into gated convs, the fair baseline) | "masked" | "compact"
    p50_ms: float
    p90_ms: float
    macs: float           # mean per sample (dense MACs for "dense"; gated count for the others)


@dataclass(frozen=True)
class BenchReport:
    arch: str
    batch_size: int
    input_size: Tuple[int, int, int]
    threads: int
    keep: float           # mean keep ratio over gated layers
    rows: Tuple[BenchRow, ...]
    strategies: Dict[str, int]
    chains: int = 0       # producer → consumer pairs that pass compact tensors

    def row(self, variant: str) -> BenchRow:
        return next(r for r in self.rows if r.variant == variant)

    @property
    def macs_ratio(self) -> float:
        return self.row("compact").macs / self.row("dense").macs

    @property
    def latency_ratio(self) -> float:
        """Compact against the dense network with the same BN folding: the speed-up gating itself buys."""
        return self.row("compact").p50_ms / self.row("dense-folded").p50_ms


@torch.no_grad()
def oracle_masks(model: GatedModel, x: torch.Tensor, r: float) -> Dict[str, torch.Tensor]:
    mode, old_r = model.mode, model.r
    model.set_gates("oracle", r=r)
    model(x)
    masks = dict(model.last_stats.masks)
    model.set_gates(mode, r=old_r)
    return masks


@torch.no_grad()
def bench(model: GatedModel, x: torch.Tensor, *, masks: Optional[Mapping[str, torch.Tensor]] = None,
          warmup: int = 5, reps: int = 30, threads: Optional[int] = None, calibrate: bool = True) -> BenchReport:
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        gated = copy.deepcopy(model).eval().set_gates("predict")
        dense = model.plain_backbone()        # the plain source network: no gates, no hooks

        def masked():
            with gated.forcing(masks) if masks is not None else nullcontext():
                return gated(x)
        masked()
        stats = gated.last_stats
        layer_keep = {n: float(m.float().mean()) for n, m in stats.masks.items()}
        keep = sum(layer_keep.values()) / len(layer_keep) if layer_keep else 1.0
        # a model without gates (a static twin) has nothing to compact: only its dense rows are timed. Each conv's
        # strategy is calibrated at the keep ratio its masks really have on this input
        compact = make_compact(gated, calibrate=calibrate, input_size=tuple(x.shape[1:]),
                               keep=layer_keep or 0.7) if model.units else None
        folded = folded_backbone(model)
        rows = []
        variants = [("dense", lambda: dense(x), stats.dense_macs), ("dense-folded", lambda: folded(x), stats.dense_macs)]
        if compact is not None:
            variants += [("masked", masked, float(stats.macs.mean())), ("compact", lambda: compact(x, masks), float(stats.macs.mean()))]
        for name, fn, macs in variants:
            p50, p90 = time_ms(fn, warmup, reps, x.device)
            rows.append(BenchRow(name, p50, p90, macs))
        counts: Dict[str, int] = {}
        for s in (compact.strategies.values() if compact is not None else ()):
            counts[s] = counts.get(s, 0) + 1
        return BenchReport(str(model.meta.arch) if model.meta is not None else "?", x.shape[0], tuple(x.shape[1:]),
                           torch.get_num_threads(), keep, tuple(rows), counts, len(compact.chains) if compact is not None else 0)
    finally:
        torch.set_num_threads(old_threads)
