"""Accuracy and compute of a GatedModel over a data loader (one pass; a whole run's evaluation is ``eval.run``)."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, Mapping, Optional

import torch
from torch.utils.data import DataLoader

from ..gating.ftwt_count import ftwt_counter_macs
from ..gating.model import GatedModel
from ..runtime.dist import Dist, all_sum, all_sum_tensor, gather_cat

if TYPE_CHECKING:
    from ..runtime.device import Precision

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
    fire_rate: Dict[str, torch.Tensor] = field(default_factory=dict)   # gated layer -> (C_out,) share of samples it fires on
    correct: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))   # (N,) top-1 right
    ftwt_macs: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))  # (N,) FTWT's count

    @property
    def varying_share(self) -> float:
        """The share of gated channels whose firing rate lies in (0.05, 0.95): the decisions that vary per image."""
        rates = torch.cat([r for r in self.fire_rate.values()]) if self.fire_rate else torch.zeros(0)
        return float(((rates > 0.05) & (rates < 0.95)).float().mean()) if rates.numel() else 0.0

    @property
    def mean_macs(self) -> float:
        return float(self.macs.mean())

    @property
    def reduction(self) -> float:
        return 1.0 - self.mean_macs / self.dense_macs


@torch.no_grad()
def evaluate_loader(model: GatedModel, loader: DataLoader, *, with_agreement: bool = False,
                    on_batch: Optional[Callable[[int], None]] = None, precision: Optional["Precision"] = None,
                    dist: Optional["Dist"] = None, forced: Optional[Mapping[str, torch.Tensor]] = None) -> EvalResult:
    """One pass in eval mode with the model's current gate mode, on the model's device (under ``precision``'s
    autocast when given). ``with_agreement`` also computes the ground truth at the model's r (costs a sort per layer)
    to score the gates' precision and recall. Under torchrun (``dist``) each process passes its own shard and the
    counts, per-sample MACs and keep ratios of all processes are combined: every sample counted exactly once.
    ``forced``: one (C_out,) bool mask per gated layer applied to every image (a static mask; the gates still run)."""
    t0 = time.perf_counter()
    was = model.training
    model.eval()
    collect = with_agreement and model.mode == "predict"
    correct1 = correct5 = n = 0
    macs, gates = [], 0.0
    keep: Dict[str, list] = {u.name: [] for u in model.units}
    tp: Dict[str, float] = {}
    fp: Dict[str, float] = {}
    fn: Dict[str, float] = {}
    fired: Dict[str, torch.Tensor] = {}
    right, ftwt = [], []
    try:
        for x, y in loader:
            if precision is not None:
                x, y = precision.batch(x), y.to(precision.device, non_blocking=True)
            else:
                dev = next(model.parameters()).device
                x, y = x.to(dev), y.to(dev)
            force = {k: m.to(x.device).expand(len(y), -1) for k, m in forced.items()} if forced is not None else None
            with model.collecting() if collect else nullcontext(), (precision.autocast() if precision else nullcontext()), \
                    model.forcing(force) if force is not None else nullcontext():
                out = model(x)
            s = model.last_stats
            top = out.topk(min(5, out.shape[1]), dim=1).indices
            right.append(top[:, 0] == y)              # on the device: one copy to the CPU at the end
            correct1 += int(right[-1].sum())
            correct5 += int((top == y[:, None]).any(1).sum())
            n += len(y)
            macs.append(s.macs.cpu())
            gates += float(s.gate_macs.sum())
            ftwt.append(ftwt_counter_macs(model.plan.ops, model.units, s, model.attention_macs(tuple(x.shape[1:]))))
            for name, m in s.masks.items():
                fired[name] = fired.get(name, 0) + m.sum(0, dtype=torch.float64)
            for name in keep:
                m = s.masks.get(name)
                keep[name].append(m.float().mean(1).cpu() if m is not None else torch.ones(len(y)))
            for name, t in model.last_targets.items():
                p = s.masks[name]
                tp[name] = tp.get(name, 0.0) + float((p & t).sum())
                fp[name] = fp.get(name, 0.0) + float((p & ~t).sum())
                fn[name] = fn.get(name, 0.0) + float((~p & t).sum())
            if on_batch:
                on_batch(len(y))
    finally:
        model.train(was)
    macs_t = torch.cat(macs) if macs else torch.zeros(0, dtype=torch.float64)
    keep_t = {k: torch.cat(v) if v else torch.zeros(0) for k, v in keep.items()}
    right_t = torch.cat(right).cpu() if right else torch.zeros(0, dtype=torch.bool)
    ftwt_t = torch.cat(ftwt).cpu() if ftwt else torch.zeros(0, dtype=torch.float64)
    fired = {k: v.cpu() for k, v in fired.items()}
    dense = s.dense_macs if n else 0.0
    if dist is not None and dist.active:           # all processes' shards, each sample once
        dev = next(model.parameters()).device
        tot = all_sum({"c1": correct1, "c5": correct5, "n": n, "gates": gates, "dense": dense, "with": float(n > 0),
                       **{f"tp/{k}": v for k, v in tp.items()}, **{f"fp/{k}": v for k, v in fp.items()},
                       **{f"fn/{k}": v for k, v in fn.items()}}, dist, dev)
        correct1, correct5, n, gates = int(tot["c1"]), int(tot["c5"]), int(tot["n"]), tot["gates"]
        dense = tot["dense"] / max(tot["with"], 1.0)             # the same on every process that saw samples
        names = list(tp)
        tp, fp, fn = ({k: tot[f"{w}/{k}"] for k in names} for w in ("tp", "fp", "fn"))
        macs_t = gather_cat(macs_t.double(), dist, dev)
        keep_t = {k: gather_cat(v.float(), dist, dev) for k, v in keep_t.items()}
        right_t = gather_cat(right_t.to(torch.uint8), dist, dev).bool()
        ftwt_t = gather_cat(ftwt_t, dist, dev)
        fired = {k: all_sum_tensor(v, dist, dev) for k, v in fired.items()}
    agreement = {k: {"precision": tp[k] / max(tp[k] + fp[k], 1.0), "recall": tp[k] / max(tp[k] + fn[k], 1.0)} for k in tp}
    return EvalResult(correct1 / max(n, 1), correct5 / max(n, 1), n, dense, macs_t, gates / max(n, 1),
                      {k: v for k, v in keep_t.items() if v.numel()}, agreement, time.perf_counter() - t0,
                      {k: (v / max(n, 1)).float() for k, v in fired.items()}, right_t, ftwt_t)
