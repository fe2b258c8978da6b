"""A static twin as a run directory: the source run's backbone pruned to a MACs target, with no gates.

It is a run like any other (``ftwt finetune --dense-control`` trains it, ``ftwt evaluate --gates open`` measures it,
``ftwt_cli.load`` reads it), whose metadata holds the pruning plan: ``gated_from_meta`` rebuilds the pruned shapes
from the source architecture before loading the (safetensors) weights, so nothing is ever unpickled.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch.nn as nn

from .. import __version__
from ..arch.registry import ArchSpec, head_and_stem
from ..arch.trace import trace_plan
from ..errors import FtwtError
from ..formats.meta import GatingInfo, MacsInfo, RunMeta, StaticInfo, environment
from ..formats.rundir import read_meta, write_new_run
from ..gating.model import GatedModel, model_macs
from ..static.prune import Calib, StaticOptions, StaticResult, prune_to_macs
from .loader import load

__all__ = ["make_static_run", "load_static", "StaticRunReport"]


@dataclass(frozen=True)
class StaticRunReport:
    run_dir: Path
    result: StaticResult
    source_macs: float


def make_static_run(source_run: Path | str, run_dir: Path | str, target_macs: float, importance: str = "l1", *,
                    calib: Optional[Calib] = None, force: bool = False,
                    options: StaticOptions = StaticOptions()) -> StaticRunReport:
    """Prune the backbone of ``source_run`` (an attached run: the user's checkpoint, gates unused) with Torch-Pruning
    to ``target_macs`` (within 0.5%; the classifier's outputs kept) and write it as the new run ``run_dir``."""
    source_run, run_dir = Path(source_run), Path(run_dir)
    meta = read_meta(source_run)
    backbone = load(source_run).plain_backbone()
    head, _ = head_and_stem(backbone, ArchSpec(meta.arch.source, meta.arch.name))
    size = tuple(meta.data_config.input_size)
    res = prune_to_macs(backbone, size, target_macs, importance, ignored=[head] if head else [], calib=calib,
                        options=options)
    plan = trace_plan(res.model, size)
    source_macs = model_macs(backbone, size)
    new = RunMeta(
        arch=meta.arch, source=meta.source, data_config=meta.data_config, gating=GatingInfo([], []), plan=plan,
        macs=MacsInfo(res.macs, 0, list(size)),
        history=[*meta.history, {"command": "static", "importance": importance, "target_macs": target_macs,
                                 "options": dataclasses.asdict(options), "from_run": str(source_run),
                                 "ftwt_version": __version__}],
        classes=meta.classes, environment=environment(), source_eval=meta.source_eval,
        static=StaticInfo(importance, float(target_macs), res.macs, res.tp_macs, res.ratio, source_macs, res.plan.to_dict()),
        ftwt_version=__version__)
    write_new_run(run_dir, new, GatedModel(res.model, plan, []).state_dict(), force=force)
    return StaticRunReport(run_dir, res, source_macs)


def load_static(path: Path | str, device: str | None = None) -> nn.Module:
    """A statically pruned model (a run made by ``ftwt sweep``'s static points, or ``make_static_run``)
    as a plain ``nn.Module`` in eval mode: the source architecture, pruned by its plan, with its weights
    (``weights_only`` loading: safetensors)."""
    model = load(path, device=device)
    if model.meta.static is None:
        raise FtwtError(f"{path} is not a statically pruned model", "pass the run of a static point (ftwt sweep --static)")
    return model.plain_backbone()
