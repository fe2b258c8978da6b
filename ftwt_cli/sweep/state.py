"""A sweep's state on disk: its settings (what every point shares), its points with their results, and
``sweep.json``, rewritten atomically after every step so that a re-run continues where the last one stopped."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .. import __version__
from ..data import DataChoice
from ..errors import FtwtError
from ..formats.rundir import atomic_write_text
from ..static.prune import StaticOptions

__all__ = ["SweepSettings", "Point", "planned_points", "read_sweep", "write_sweep", "point_from", "SWEEP_FILE",
           "SWEEP_FORMAT_VERSION", "KINDS"]

SWEEP_FILE = "sweep.json"
SWEEP_FORMAT_VERSION = 1
KINDS = ("dense", "control", "dynamic", "hybrid", "static")     # Point.kind


@dataclass
class SweepSettings:
    """What every point shares; a sweep folder holds one setting (re-running with other settings is refused)."""
    checkpoint: str
    checkpoint_sha256: str
    data: str
    attach: Dict[str, Any] = field(default_factory=dict)     # AttachOptions.to_dict()
    fit_gates: Dict[str, Any] = field(default_factory=dict)   # resolved FitGatesConfig (r and target_cut per point)
    finetune: Dict[str, Any] = field(default_factory=dict)    # resolved FinetuneConfig; epochs 0: no finetune
    # the static twins' Torch-Pruning settings beyond the importance (StaticOptions; a sweep.json without them had the defaults)
    static: Dict[str, Any] = field(default_factory=lambda: dataclasses.asdict(StaticOptions()))
    val_split: Optional[float] = None                          # the DataChoice, flat (as sweep.json has always held it)
    train_samples: Optional[int] = None

    @property
    def choice(self) -> DataChoice:
        return DataChoice(self.val_split, self.train_samples)


@dataclass
class Point:
    kind: str                              # one of KINDS
    name: str                              # its run directory under the sweep folder
    r: Optional[float] = None              # dynamic: the rule's r (found from target_cut if given); static: its twin's
    target_cut: Optional[float] = None
    importance: Optional[str] = None       # static: Torch-Pruning importance
    twin: Optional[str] = None             # static: the dynamic or hybrid point it matches; hybrid: its dynamic point
    epsilon: Optional[float] = None        # hybrid: the firing-rate threshold (``runs.hybrid``)
    status: str = "pending"                # pending | done | failed
    error: Optional[str] = None
    run: str = ""                          # the run directory, as given
    top1: Optional[float] = None
    top5: Optional[float] = None
    macs_mean: Optional[float] = None      # per sample, gates included
    dense_macs: Optional[float] = None     # the source model's
    oracle_macs: Optional[float] = None    # dynamic: oracle masks at r on the source, before any training
    oracle_top1: Optional[float] = None
    target_macs: Optional[float] = None    # static: what it was pruned to
    tp_macs: Optional[float] = None        # static: Torch-Pruning's count of its conv and linear layers
    latency_ms: Optional[float] = None     # with bench: median latency at batch 1 on this machine (``ftwt bench``)
    latency32_ms: Optional[float] = None   # with bench: the same at batch 32 (per batch)
    samples: Optional[int] = None          # validation images its top-1 is measured on
    correct_bits: Optional[str] = None     # per validation image, top-1 right: ``paired.pack`` (the paired test)
    seconds: float = 0.0

    @property
    def cut(self) -> Optional[float]:
        return None if self.macs_mean is None or not self.dense_macs else 1.0 - self.macs_mean / self.dense_macs


def _name(x: float) -> str:
    return f"{x:g}"


def planned_points(rs: Sequence[float], target_cuts: Sequence[float], static: Optional[str], dense_control: bool,
                   static_label: str = "", hybrid: Optional[float] = None) -> List[Point]:
    """The dense point; per r and target cut a dynamic point, its static twin, and with ``hybrid`` (ε) the hybrid made
    from the dynamic point's fitted gates with a static twin of its own; the dense control."""
    pts = [Point("dense", "dense")]
    dyn = [Point("dynamic", f"dynamic-r{_name(r)}", r=r) for r in rs] + \
          [Point("dynamic", f"dynamic-cut{_name(c)}", target_cut=c) for c in target_cuts]
    for p in dyn:
        at = p.name[len('dynamic-'):]
        pts.append(p)
        if static:
            pts.append(Point("static", f"static-{static}{static_label}-{at}", importance=static, twin=p.name))
        if hybrid is not None:
            h = Point("hybrid", f"hybrid-e{_name(hybrid)}-{at}", r=p.r, target_cut=p.target_cut, twin=p.name,
                      epsilon=hybrid)
            pts.append(h)
            if static:
                pts.append(Point("static", f"static-{static}{static_label}-{h.name}", importance=static, twin=h.name))
    if dense_control:
        pts.append(Point("control", "control"))
    return pts


def read_sweep(out: Path) -> Optional[dict]:
    f = out / SWEEP_FILE
    if not f.is_file():
        return None
    try:
        doc = json.loads(f.read_text())
        if not isinstance(doc, dict) or doc.get("format") != "ftwt-sweep":
            raise ValueError("not a sweep file")
    except (OSError, ValueError) as e:
        raise FtwtError(f"{f} is damaged ({e})", "move it away to start the sweep over, or pass another --out") from None
    if int(doc.get("format_version", 0)) > SWEEP_FORMAT_VERSION:
        raise FtwtError(f"{f} was written by a newer ftwt", "upgrade ftwt")
    return doc


def write_sweep(out: Path, settings: SweepSettings, points: List[Point]) -> None:
    doc = {"format": "ftwt-sweep", "format_version": SWEEP_FORMAT_VERSION, "ftwt_version": __version__,
           "settings": dataclasses.asdict(settings),
           "points": [{**dataclasses.asdict(p), "cut": p.cut} for p in points]}
    atomic_write_text(out / SWEEP_FILE, json.dumps(doc, indent=1))


def point_from(d: Mapping) -> Point:
    names = {f.name for f in dataclasses.fields(Point)}
    return Point(**{k: v for k, v in d.items() if k in names})
