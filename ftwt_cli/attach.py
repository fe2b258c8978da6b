"""``ftwt attach``: checkpoint → architecture → traced plan → GatedModel → new run directory."""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from . import __version__
from .arch.dataconfig import DataConfig, resolve_data_config
from .arch.detect import Detection, detect_arch
from .arch.plan import Unit
from .arch.registry import build_model, head_and_stem, load_weights, parse_arch
from .arch.trace import trace_plan
from .errors import FtwtError
from .formats.checkpoints import read_checkpoint
from .formats.meta import ArchInfo, GatingInfo, MacsInfo, RunMeta, SourceInfo, environment
from .formats.rundir import check_replaceable, write_new_run
from .gating.gate import check_group_size
from .gating.macs import gated_share
from .gating.model import GatedModel

__all__ = ["attach", "AttachOptions", "AttachReport", "LayerRow", "parse_input_size", "MIN_GATEABLE_SHARE", "LOW_GATEABLE_SHARE"]

# Below this share of the model's MACs in gateable convs and MLPs, gating cannot pay for its gates (a model whose MLPs
# are all gated GLUs: EVA-02 2%). CNNs hold 40–99% even at small inputs; a ViT's MLPs about 60%; efficient hybrids
# (LeViT, TinyViT, MambaOut) 14–24%, where attach warns that the saving is capped at that share.
MIN_GATEABLE_SHARE = 0.10
LOW_GATEABLE_SHARE = 0.25


@dataclass(frozen=True)
class AttachOptions:
    """How ``attach`` reads a checkpoint: what to check it against (arch, classes, stem channels), the input config
    that overrides what it states (size, mean/std, interpolation, crop, augmentation), how to read it (pickles, EMA
    weights) and which units to gate. Built once from the flags; a sweep saves ``to_dict()`` in ``sweep.json``."""
    arch: Optional[str] = None
    num_classes: Optional[int] = None
    in_chans: Optional[int] = None
    input_size: Optional[Tuple[int, int, int]] = None
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    interpolation: Optional[str] = None
    crop_pct: Optional[float] = None
    augment: Optional[str] = None
    trust_pickle: bool = False
    use_ema: bool = False
    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    gate_shortcuts: bool = False
    depthwise_follow: bool = False   # a depthwise conv reading a gated unit's output follows its mask (no gate)
    group_size: int = 1              # channels per gate decision (the last group of a layer holds the remainder)
    residual_stream: bool = False    # a residual block's output is gated after its add, not the conv before it

    def __post_init__(self) -> None:     # lists (JSON, callers) become tuples: the options are frozen and hashable
        for k in ("input_size", "mean", "std", "include", "exclude"):
            v = getattr(self, k)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, k, tuple(v))
        check_group_size(self.group_size)

    @property
    def input_flags(self) -> Dict[str, object]:
        """The input-config overrides, by DataConfig field (None: not given)."""
        return {"input_size": self.input_size, "mean": self.mean, "std": self.std, "interpolation": self.interpolation,
                "crop_pct": self.crop_pct, "augment": self.augment}

    def to_dict(self) -> dict:
        """JSON-ready (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "AttachOptions":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise FtwtError(f"unknown attach option(s) {', '.join(sorted(unknown))}",
                            f"use {', '.join(f.name for f in fields(cls))}")
        return cls(**d)


@dataclass(frozen=True)
class LayerRow:
    name: str
    in_channels: int
    out_channels: int
    kernel: Tuple[int, int]
    groups: int
    dense_macs: float          # the MACs the unit's mask scales: its conv, or an MLP's fc1 (both halves) and fc2
    gate_macs: int
    kind: str = "conv"         # "conv" | "mlp" | "glu" | "stream" (a residual block's output)


@dataclass(frozen=True)
class AttachReport:
    run_dir: Path
    arch: str
    num_classes: int
    in_chans: int
    input_size: Tuple[int, int, int]
    source_format: str
    layers: Tuple[LayerRow, ...]
    dense_macs: float          # whole source model, ptflops-aten convention
    gate_macs: int             # all gates, dense inputs
    not_gated: Dict[str, str]  # conv -> reason
    alternatives: Tuple[str, ...] = ()
    data_config: Optional[DataConfig] = None
    input_source: str = ""     # where the input config came from
    gated_share: float = 1.0   # share of the dense MACs that gating scales (gateable convs, MLP fc1 and fc2)
    other_functions: Tuple[str, ...] = ()      # alternatives that compute another function on these weights
    other_preprocessing: Tuple[str, ...] = ()  # alternatives computing the same function with other preprocessing
    choice_rule: str = ""                      # why ``arch`` was chosen among the alternatives
    group_size: int = 1                        # channels per gate decision

    @property
    def short_groups(self) -> Dict[str, int]:
        """Gated layers whose last channel group is shorter than ``group_size``: name → its channels."""
        g = self.group_size
        return {l.name: l.out_channels % g for l in self.layers if g > 1 and l.gate_macs and l.out_channels % g}


def parse_input_size(text: Optional[str]) -> Optional[Tuple[int, int, int]]:
    if text is None:
        return None
    try:
        c, h, w = (int(v) for v in text.split(","))
        if min(c, h, w) <= 0:
            raise ValueError
        return c, h, w
    except ValueError:
        raise FtwtError(f"--input-size {text} is not C,H,W", "pass three positive integers, e.g. --input-size 3,224,224") from None


def _arch_for(sd, arch: Optional[str], hub_config, hint: Optional[str]) -> Detection:
    if arch is None:
        return detect_arch(sd, hub_config, hint)
    spec = parse_arch(arch)
    m = build_model(spec, meta=True)
    head, stem = head_and_stem(m, spec)
    nc = int(sd[f"{head}.weight"].shape[0]) if head and f"{head}.weight" in sd else None
    ic = int(sd[f"{stem}.weight"].shape[1]) if stem and f"{stem}.weight" in sd else 3
    return Detection(spec, nc, ic)


def _select(units, include: Sequence[str], exclude: Sequence[str]):
    chosen = [u for u in units if not include or any(fnmatch.fnmatchcase(u.name, p) for p in include)]
    return [u for u in chosen if not any(fnmatch.fnmatchcase(u.name, p) for p in exclude)]


def attach(checkpoint: Path | str, options: Optional[AttachOptions] = None, *, run_dir: Path | str = "ftwt-run",
           force: bool = False, **flags: Any) -> AttachReport:
    """Read ``checkpoint``, find its architecture and input config, trace it and write a new run with one gate per
    gateable unit. ``options`` (or, for a call from Python, its fields as keywords: ``attach(ckpt, arch="timm:resnet18")``)
    say how. Input config precedence: the architecture's reference weights < what the checkpoint states (a timm
    train.py checkpoint's args, a pretrained_cfg, a hub config.json) < the options."""
    if options is not None and flags:
        raise TypeError("attach() takes options or keyword flags, not both")
    o = options if options is not None else AttachOptions(**flags)
    run_dir = Path(run_dir)
    check_replaceable(run_dir, force=force, inputs=[Path(checkpoint)])     # fail before any slow work
    ckpt = read_checkpoint(checkpoint, use_ema=o.use_ema, trust_pickle=o.trust_pickle)
    det = _arch_for(ckpt.state_dict, o.arch, ckpt.hub_config, ckpt.arch)
    num_classes, in_chans = o.num_classes, o.in_chans
    if num_classes is not None and det.num_classes is not None and num_classes != det.num_classes:
        raise FtwtError(f"--num-classes {num_classes} but the checkpoint's head has {det.num_classes} classes",
                        f"drop --num-classes or pass --num-classes {det.num_classes}")
    if in_chans is not None and in_chans != det.in_chans:
        raise FtwtError(f"--in-chans {in_chans} but the checkpoint's stem reads {det.in_chans} channels",
                        f"drop --in-chans or pass --in-chans {det.in_chans}")
    nc = det.num_classes if det.num_classes is not None else num_classes
    model = build_model(det.arch, nc, det.in_chans)
    load_weights(model, ckpt.state_dict, det.arch)
    model.eval()

    # the input the model expects: its architecture's reference config, then what the checkpoint says, then flags
    given = o.input_flags
    stated = {k: v for k, v in ckpt.input_config.items() if given.get(k) is None}     # a flag overrides, unread
    dc = resolve_data_config(det.arch, model, det.in_chans).updated(stated, "the checkpoint")
    dc = dc.updated(given, "the flags")

    try:
        plan = trace_plan(model, dc.input_size, gate_shortcuts=o.gate_shortcuts, depthwise_follow=o.depthwise_follow,
                          residual_stream=o.residual_stream)
    except RuntimeError as e:
        raise FtwtError(f"{det.arch} cannot run at input size {dc.input_size} ({str(e).splitlines()[0]})",
                        "pass a larger --input-size") from None
    if o.residual_stream and not any(u.kind == "stream" for u in plan.units):
        raise FtwtError(f"--residual-stream: {det.arch} has no residual block whose sum (input or shortcut conv + "
                        "branch conv) a mask can follow", "drop --residual-stream (it is for ResNet-style blocks)")
    units = _select(plan.units, o.include, o.exclude)
    if not plan.units:
        raise FtwtError(f"{det.arch} has nothing gateable: no Conv2d followed only by BatchNorm/activation feeds a later layer, "
                        "and no fc1 → activation → fc2 MLP runs on tokens", "use a model built from convolutions or MLP blocks")
    if not units:
        raise FtwtError("--include/--exclude left no layer to gate", "loosen the patterns (they match layer names, e.g. 'layer*.conv*')")
    if o.depthwise_follow:
        chosen = {u.name for u in units}
        # a follower whose producer is not gated keeps a gate of its own
        plan.units = [u if not u.follows or u.follows in chosen else Unit(**{**asdict(u), "kernel": tuple(u.kernel), "follows": None})
                      for u in plan.units]
        units = _select(plan.units, o.include, o.exclude)
        if not any(u.follows for u in units):
            raise FtwtError(f"--depthwise-follow: {det.arch} has no depthwise conv that reads a gated unit's whole output",
                            "drop --depthwise-follow (it is for inverted residuals: MobileNetV2, EfficientNet, MixNet)")

    gated = GatedModel(model, plan, [u.name for u in units], group_size=o.group_size).eval()
    dense = gated.dense_macs(dc.input_size)
    if o.depthwise_follow:
        # a depthwise conv that follows nothing (its expansion is not gated, e.g. a 1×1 conv on a 1×1 map) would keep a
        # C×C gate of its own, which costs more than the conv once C ≥ k²·H·W: left ungated, as such convs are
        costly = {u.name for u in units if u.kind == "conv" and not u.follows and u.groups == u.in_channels == u.out_channels
                  and u.in_channels * u.out_channels >= float(dense.per_op[u.name][0])}
        if costly:
            units = [u for u in units if u.name not in costly]
            plan.rejected.update({n: "a depthwise conv that follows no gated unit, whose gate would cost more than the conv"
                                  for n in costly})
            gated = GatedModel(model, plan, [u.name for u in units], group_size=o.group_size).eval()
            dense = gated.dense_macs(dc.input_size)
    share = gated_share(plan.units, dense.per_op, float(dense.total[0]))
    if share < MIN_GATEABLE_SHARE:
        raise FtwtError(f"{det.arch} has nothing worth gating: only {share:.0%} of its MACs are in gateable convolutions "
                        "and MLPs (attention and other layers stay dense)", "use a model whose compute is in convolutions or MLP blocks")

    rows = tuple(LayerRow(u.name, u.in_channels, u.out_channels, tuple(u.kernel), u.groups,
                          sum(float(dense.per_op[n][0]) for n in (u.name, u.reader, u.partner, *u.computes) if n in dense.per_op),
                          0 if u.follows else u.in_channels * gated.gate_outputs[u.name], u.kind) for u in units)
    meta = RunMeta(
        arch=ArchInfo(det.arch.source, det.arch.name, nc, det.in_chans),
        source=SourceInfo(str(ckpt.path), ckpt.sha256, ckpt.fmt, list(det.other_functions)),
        data_config=dc,
        gating=GatingInfo([u.name for u in units], [{"name": r.name, "in_channels": r.in_channels, "out_channels": r.out_channels,
                                                      "kernel": list(r.kernel), "groups": r.groups} for r in rows],
                          group_size=o.group_size),
        plan=plan,
        macs=MacsInfo(float(dense.total[0]), gated.gate_macs_dense(), list(dc.input_size)),
        history=[{"command": "attach", "ftwt_version": __version__}],
        classes=list(ckpt.classes) if ckpt.classes else None,
        environment=environment(),
        ftwt_version=__version__)
    write_new_run(run_dir, meta, gated.state_dict(), force=force, inputs=[Path(checkpoint)])
    return AttachReport(run_dir, str(det.arch), nc, det.in_chans, dc.input_size, ckpt.fmt, rows,
                        float(dense.total[0]), gated.gate_macs_dense(),
                        {n: w for n, w in plan.rejected.items()} | {u.name: "excluded by --include/--exclude" for u in plan.units if u not in units},
                        det.alternatives, dc,
                        "from the flags" if any(v is not None for v in given.values())
                        else "as the checkpoint states" if ckpt.input_config else "the architecture's reference config",
                        share, det.other_functions, det.other_preprocessing, det.rule, o.group_size)
