"""Build a GatedModel from a run directory (and, later, from an exported file): ``ftwt_cli.load``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from .archs import ArchSpec, DataConfig, build_model
from .dataflow import Plan
from .errors import FtwtError
from .gating import GatedModel
from .run import META_FILE, WEIGHTS_FILE, read_meta, read_weights

__all__ = ["load", "gated_from_meta"]


def gated_from_meta(meta: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> GatedModel:
    a = meta["arch"]
    backbone = build_model(ArchSpec(a["source"], a["name"]), a["num_classes"], a["in_chans"])
    model = GatedModel(backbone, Plan.from_dict(meta["plan"]), meta["gating"]["gated"])
    missing, unexpected = model.load_state_dict(dict(state_dict), strict=False)
    if missing or unexpected:
        raise FtwtError(f"the weights do not match the metadata ({len(missing)} missing, {len(unexpected)} unexpected keys, "
                        f"e.g. {(missing or unexpected)[0]})", "re-create the run with ftwt attach --force")
    g = meta["gating"]
    model.set_gates(g.get("mode", "open"), r=g.get("r"), gt=g.get("gt"))
    model.decoupled = g.get("decoupled", True)
    model.meta = dict(meta)
    model.data_config = DataConfig.from_dict(meta["data_config"])
    return model.eval()


def load(path: str | Path) -> GatedModel:
    """A run directory → GatedModel in eval mode, gates in the run's mode ("predict" once fitted)."""
    path = Path(path)
    if path.is_dir() or not path.exists():
        meta = read_meta(path)
        return gated_from_meta(meta, read_weights(path / WEIGHTS_FILE))
    raise FtwtError(f"{path} is not a run directory", f"pass a folder holding {META_FILE} and {WEIGHTS_FILE}")
