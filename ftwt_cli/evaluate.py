"""Accuracy and compute of a GatedModel over a data loader."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch.utils.data import DataLoader

from .gating import GatedModel

__all__ = ["EvalResult", "evaluate_loader"]


@dataclass(frozen=True)
class EvalResult:
    top1: float
    top5: float
    samples: int
    dense_macs: float
    macs: torch.Tensor                 # (N,) per-sample MACs, gates included
    gate_macs: float                   # mean per sample
    keep: Dict[str, torch.Tensor]      # gated layer -> (N,) kept fraction of its filters
    agreement: Dict[str, Dict[str, float]]   # gated layer -> precision/recall of "fires" vs ground truth (if computed)
    seconds: float

    @property
    def mean_macs(self) -> float:
        return float(self.macs.mean())

    @property
    def reduction(self) -> float:
        return 1.0 - self.mean_macs / self.dense_macs


@torch.no_grad()
def evaluate_loader(model: GatedModel, loader: DataLoader, *, with_agreement: bool = False,
                    on_batch: Optional[Callable[[int], None]] = None) -> EvalResult:
    """One pass in eval mode with the model's current gate mode. ``with_agreement`` also computes the
    ground truth at the model's r (costs a sort per layer) to score the gates' precision and recall."""
    import time
    t0 = time.perf_counter()
    was, collect = model.training, model.collect_targets
    model.eval()
    model.collect_targets = with_agreement and model.mode == "predict"
    correct1 = correct5 = n = 0
    macs, gates = [], 0.0
    keep: Dict[str, list] = {u.name: [] for u in model.units}
    tp: Dict[str, float] = {}
    fp: Dict[str, float] = {}
    fn: Dict[str, float] = {}
    try:
        for x, y in loader:
            out = model(x)
            s = model.last_stats
            top = out.topk(min(5, out.shape[1]), dim=1).indices
            correct1 += int((top[:, 0] == y).sum())
            correct5 += int((top == y[:, None]).any(1).sum())
            n += len(y)
            macs.append(s.macs)
            gates += float(s.gate_macs.sum())
            for name in keep:
                m = s.masks.get(name)
                keep[name].append(m.float().mean(1) if m is not None else torch.ones(len(y)))
            for name, t in model.last_targets.items():
                p = s.masks[name]
                tp[name] = tp.get(name, 0.0) + float((p & t).sum())
                fp[name] = fp.get(name, 0.0) + float((p & ~t).sum())
                fn[name] = fn.get(name, 0.0) + float((~p & t).sum())
            if on_batch:
                on_batch(len(y))
    finally:
        model.train(was)
        model.collect_targets = collect
    agreement = {k: {"precision": tp[k] / max(tp[k] + fp[k], 1.0), "recall": tp[k] / max(tp[k] + fn[k], 1.0)} for k in tp}
    return EvalResult(correct1 / max(n, 1), correct5 / max(n, 1), n, s.dense_macs if n else 0.0,
                      torch.cat(macs) if macs else torch.zeros(0), gates / max(n, 1),
                      {k: torch.cat(v) for k, v in keep.items() if v}, agreement, time.perf_counter() - t0)
