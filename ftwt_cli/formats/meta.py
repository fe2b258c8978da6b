"""The run's metadata (``ftwt.json``) as small typed, versioned dataclasses.

``RunMeta.from_dict`` reads what this and earlier releases wrote (format version ≤ ``FORMAT_VERSION``) and rejects
unknown keys, naming them; ``to_dict`` writes JSON-ready dicts. Every module reads metadata through these fields.
"""
from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any, Dict, List, Mapping, Optional, Type, TypeVar

from .. import __version__
from ..arch.dataconfig import DataConfig
from ..arch.plan import Plan
from ..errors import FtwtError

__all__ = ["FORMAT_VERSION", "RUN_FORMAT", "environment", "RunFiles", "ArchInfo", "SourceInfo", "GatingInfo", "MacsInfo", "EvalSummary",
           "TrainingRecord", "StaticInfo", "SourceEval", "RunMeta"]

FORMAT_VERSION = 2          # 2: may hold a static model (``static``), MLP units or attention MACs; 1 otherwise
RUN_FORMAT = "ftwt-run"

T = TypeVar("T")


def environment(device: Optional[str] = None, amp: str = "off") -> Dict[str, str]:
    """What ran: ftwt, Python, torch, torchvision and timm versions, the device and the autocast mode."""

    import torch  # deferred: the run's metadata reads without torch (ftwt info)
    import torchvision  # deferred: torchvision loads only when this runs (start-up)

    # timm's version from its package metadata (the same string as timm.__version__): importing timm only to read it
    # would add seconds to every command on a torchvision model
    return {"ftwt": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": version("timm"), "device": device or "cpu", "amp": amp}


def _build(cls: Type[T], d: Any, where: str) -> T:
    """``cls(**d)``, rejecting unknown and missing keys with a one-line error that names them."""
    if not isinstance(d, Mapping):
        raise FtwtError(f"{where} is not a mapping", "re-create the run with ftwt attach --force")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise FtwtError(f"unknown key '{unknown[0]}' in {where}", f"valid keys: {', '.join(sorted(names))}")
    try:
        return cls(**d)
    except TypeError as e:
        raise FtwtError(f"{where} is incomplete ({e})", "re-create the run with ftwt attach --force") from None


@dataclass
class ArchInfo:
    source: str                        # "timm" | "torchvision"
    name: str
    num_classes: int
    in_chans: int

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"


@dataclass
class SourceInfo:
    path: str                          # the checkpoint attach read
    sha256: str
    format: str
    # other architectures the weights fit that compute another function (attach chose the plain family): what a
    # near-chance first evaluation names as the likely right ones
    alternatives: List[str] = field(default_factory=list)


@dataclass
class SourceEval:
    """The source checkpoint's own accuracy, measured on the first data a command saw (before any training), so that
    every later report states its change against the model the user brought."""
    top1: float
    top5: float
    samples: int
    data: str                          # the data source it was measured on (``DataSplits.source``)
    split: str = "val"


@dataclass
class GatingInfo:
    gated: List[str]                   # gated unit names, in forward order
    layers: List[Dict[str, Any]] = field(default_factory=list)   # per layer: name, channels, kernel, groups
    mode: str = "open"                 # "open" until fit-gates, then "predict"
    r: Optional[float] = None
    gt: str = "mass"
    decoupled: bool = True
    group_size: int = 1                # channels per gate decision (attach --group-size); written only when > 1
    # unit → its channels without a gate, always open (a hybrid model, ``ftwt hybrid``); written only when any
    fixed_open: Dict[str, int] = field(default_factory=dict)


@dataclass
class MacsInfo:
    dense: float                       # MACs of the source model at input_size
    gates: int                         # MACs of all gates with dense inputs
    input_size: List[int]


@dataclass
class EvalSummary:
    """The last evaluation a training epoch made (validation split)."""
    phase: str
    epoch: int
    top1: float
    top5: float
    macs: float                        # mean per sample, gates included
    dense_macs: float
    reduction: float
    data: str
    split: str
    samples: int


@dataclass
class TrainingRecord:
    config: Dict[str, Any]             # the resolved FitGatesConfig / FinetuneConfig
    data: str                          # the --data argument
    data_source: str                   # what it resolved to
    epochs: List[Dict[str, Any]]       # train.EpochStats as dicts


@dataclass
class RunFiles:
    """The files of the run's current state, by name inside the run directory (the commit ``ftwt.json`` points at)."""
    weights: str = "weights.safetensors"
    checkpoint: Optional[str] = None   # the resumable training state, once a training epoch has run


@dataclass
class StaticInfo:
    """A statically pruned model (a sweep's static twin): how it was pruned, and its pruning plan
    (``static.PruningPlan.to_dict()``), which rebuilds its shapes from the source architecture."""
    importance: str
    target_macs: float                 # the MACs it was pruned to (a dynamic point's mean)
    macs: float                        # its MACs (ftwt's count)
    tp_macs: float                     # Torch-Pruning's count of its conv and linear layers
    ratio: float                       # per-layer share of channels removed
    source_macs: float                 # the unpruned model's MACs
    plan: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RunMeta:
    arch: ArchInfo
    source: SourceInfo
    data_config: DataConfig
    gating: GatingInfo
    plan: Plan
    macs: Optional[MacsInfo] = None
    history: List[Dict[str, Any]] = field(default_factory=list)
    training: Dict[str, TrainingRecord] = field(default_factory=dict)
    last_eval: Optional[EvalSummary] = None
    evaluation: Optional[Dict[str, Any]] = None    # an exported file's report (eval.EvalReport.to_dict())
    files: RunFiles = field(default_factory=RunFiles)
    classes: Optional[List[str]] = None            # class names in label order, once a command has seen data
    environment: Dict[str, str] = field(default_factory=dict)   # versions and device of the last command that wrote
    static: Optional[StaticInfo] = None            # a statically pruned model (its plan); None for a gated run
    source_eval: Optional[SourceEval] = None       # the source checkpoint's accuracy on the first data seen
    ftwt_version: str = ""
    format: str = RUN_FORMAT
    format_version: int = 1            # written as 2 when the run holds a static model, MLP units or attention MACs

    def trained_data(self) -> Optional[str]:
        """The ``--data`` the run was last trained on (None before any training)."""
        return next((t.data for t in reversed(list(self.training.values())) if t.data), None)

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["data_config"] = self.data_config.to_dict()
        d["plan"] = self.plan.to_dict()
        for k in ("arch", "source", "gating", "macs", "last_eval", "files", "static", "source_eval"):
            d[k] = dataclasses.asdict(d[k]) if d[k] is not None else None
        d["training"] = {k: dataclasses.asdict(v) for k, v in self.training.items()}
        if not self.source.alternatives:
            d["source"].pop("alternatives")
        for k in ("static", "source_eval"):          # keys earlier releases do not know, written only when set
            if d[k] is None:
                d.pop(k)
        if self.gating.group_size == 1:
            d["gating"].pop("group_size")
        if not self.gating.fixed_open:
            d["gating"].pop("fixed_open")
        # a CNN's run is written as 0.1.0 wrote it, so that release reads it; a static model, MLP units or attention
        # products need version 2, which older releases refuse with "upgrade ftwt"
        d["format_version"] = 2 if (self.static is not None or self.source_eval is not None
                                    or self.source.alternatives or self.plan.has_new_features
                                    or self.gating.group_size != 1 or self.gating.fixed_open) else 1
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "ftwt.json") -> "RunMeta":
        if not isinstance(d, Mapping):
            raise FtwtError(f"{where} does not hold a JSON object", "re-create the run with ftwt attach --force")
        v = d.get("format_version")
        if not isinstance(v, int) or isinstance(v, bool) or v > FORMAT_VERSION:
            raise FtwtError(f"{where} has format version {v!r}; this ftwt reads up to {FORMAT_VERSION}", "upgrade ftwt")
        d = dict(d)
        try:
            d["arch"] = _build(ArchInfo, d.get("arch"), f"{where}: arch")
            d["source"] = _build(SourceInfo, d.get("source"), f"{where}: source")
            d["gating"] = _build(GatingInfo, d.get("gating"), f"{where}: gating")
            d["data_config"] = DataConfig.from_dict(d["data_config"])
            d["plan"] = Plan.from_dict(d["plan"])
        except (KeyError, TypeError, ValueError) as e:
            raise FtwtError(f"{where} is damaged (missing or malformed {e})", "re-create the run with ftwt attach --force") from None
        if d.get("macs") is not None:
            d["macs"] = _build(MacsInfo, d["macs"], f"{where}: macs")
        if d.get("last_eval") is not None:
            d["last_eval"] = _build(EvalSummary, d["last_eval"], f"{where}: last_eval")
        d["training"] = {k: _build(TrainingRecord, t, f"{where}: training.{k}") for k, t in (d.get("training") or {}).items()}
        if "files" in d:
            d["files"] = _build(RunFiles, d["files"], f"{where}: files")
        if d.get("static") is not None:
            d["static"] = _build(StaticInfo, d["static"], f"{where}: static")
        if d.get("source_eval") is not None:
            d["source_eval"] = _build(SourceEval, d["source_eval"], f"{where}: source_eval")
        return _build(cls, d, where)
