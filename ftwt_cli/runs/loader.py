"""Build a GatedModel from a run directory or an exported file: ``ftwt_cli.load``."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Optional

import torch

from ..arch.registry import ArchSpec, build_model
from ..errors import FtwtError
from ..fast.calibrate import make_compact
from ..formats.exported import meta_from_export
from ..formats.meta import RunMeta
from ..formats.rundir import META_FILE, read_meta, read_weights
from ..gating.model import GatedModel
from ..runtime.device import resolve_device
from ..static.plan import PruningPlan, apply_plan

__all__ = ["load", "gated_from_meta"]


def gated_from_meta(meta: RunMeta, state_dict: Mapping[str, torch.Tensor]) -> GatedModel:
    a = meta.arch
    backbone = build_model(ArchSpec(a.source, a.name), a.num_classes, a.in_chans)
    if meta.static is not None:            # a statically pruned model: its shapes from the pruning plan
        apply_plan(backbone, PruningPlan.from_dict(meta.static.plan))
    model = GatedModel(backbone, meta.plan, meta.gating.gated, group_size=meta.gating.group_size,
                       fixed_open=meta.gating.fixed_open)
    sd = OrderedDict(state_dict)
    # safetensors keeps no module versions; the weights were saved from this very architecture, so its own apply
    # (torchvision's MNASNet refuses to load without one)
    sd._metadata = getattr(state_dict, "_metadata", None) or model.state_dict()._metadata
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise FtwtError(f"the weights do not match the metadata ({len(missing)} missing, {len(unexpected)} unexpected keys, "
                        f"e.g. {(missing or unexpected)[0]})", "re-create the run with ftwt attach --force")
    g = meta.gating
    model.set_gates(g.mode, r=g.r, gt=g.gt)
    model.meta = meta
    return model.eval()


def load(path: str | Path, *, compact: bool = False, calibrate: bool = True, device: Optional[str] = None):
    """A run directory or an exported .safetensors file → GatedModel in eval mode, gates in the saved mode
    ("predict" once fitted), on ``device`` (auto | cpu | cuda | cuda:N; default the CPU). ``compact=True`` returns
    the CompactModel that computes only the filters the gates keep (inference only; ``calibrate`` picks the fastest
    strategy per layer on this machine)."""
    path = Path(path)
    if path.is_file():
        model = gated_from_meta(meta_from_export(path), read_weights(path))
    elif path.is_dir() or not path.exists():
        meta = read_meta(path)
        if not (path / meta.files.weights).is_file():      # a training epoch committed meanwhile: its new state
            meta = read_meta(path)
        model = gated_from_meta(meta, read_weights(path / meta.files.weights))
    else:
        raise FtwtError(f"{path} is neither a run directory nor an exported file",
                        f"pass a folder holding {META_FILE} or a .safetensors file")
    if device is not None:
        model = model.to(resolve_device(device))
    if not compact:
        return model
    return make_compact(model.set_gates("predict"), calibrate=calibrate)
