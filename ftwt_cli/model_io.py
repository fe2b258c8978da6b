"""Build a GatedModel from a run directory or an exported file: ``ftwt_cli.load``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping

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


def _meta_from_export(path: Path) -> Dict[str, Any]:
    """Rebuild run-style metadata from an exported file's ``__metadata__`` (all values are strings)."""
    from safetensors import safe_open

    from .export import EXPORT_FORMAT, EXPORT_FORMAT_VERSION
    try:
        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a damaged file
        raise FtwtError(f"cannot read {path} ({e})", "pass a file written by `ftwt export`") from None
    if md.get("ftwt_format") != EXPORT_FORMAT:
        raise FtwtError(f"{path} has no ftwt metadata (not written by `ftwt export`, or stripped)",
                        "export it again with `ftwt export`, or load a plain state dict with `ftwt attach`")
    try:
        version = int(md.get("ftwt_format_version", ""))
    except ValueError:
        version = -1
    if version < 1 or version > EXPORT_FORMAT_VERSION:
        raise FtwtError(f"{path} has export format version {md.get('ftwt_format_version')!r}; this ftwt reads up to "
                        f"{EXPORT_FORMAT_VERSION}", "upgrade ftwt (pip install -U ftwt-cli)")
    try:
        gate = json.loads(md["gate_config"])
        return {"arch": json.loads(md["arch"]), "source": json.loads(md["source"]), "data_config": json.loads(md["data_config"]),
                "gating": {k: gate.get(k) for k in ("gated", "layers", "mode", "r", "gt", "decoupled")}, "plan": gate["plan"],
                "training": json.loads(md.get("training", "{}")), "evaluation": json.loads(md.get("evaluation", "null")),
                "ftwt_version": md.get("ftwt_version"), "format": EXPORT_FORMAT}
    except (KeyError, json.JSONDecodeError) as e:
        raise FtwtError(f"{path} has incomplete ftwt metadata ({e})", "export it again with `ftwt export`") from None


def load(path: str | Path, *, compact: bool = False, calibrate: bool = True):
    """A run directory or an exported .safetensors file → GatedModel in eval mode, gates in the saved mode
    ("predict" once fitted). ``compact=True`` returns the CompactModel that computes only the filters the
    gates keep (inference only; ``calibrate`` picks the fastest strategy per layer on this machine)."""
    path = Path(path)
    if path.is_file():
        model = gated_from_meta(_meta_from_export(path), read_weights(path))
    elif path.is_dir() or not path.exists():
        model = gated_from_meta(read_meta(path), read_weights(path / WEIGHTS_FILE))
    else:
        model = None
    if model is not None:
        if not compact:
            return model
        from .compact import make_compact
        return make_compact(model.set_gates("predict"), calibrate=calibrate)
    raise FtwtError(f"{path} is neither a run directory nor an exported file", f"pass a folder holding {META_FILE} or a .safetensors file")
