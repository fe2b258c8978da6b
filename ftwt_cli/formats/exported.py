"""The exported file's format: one .safetensors file whose ``__metadata__`` (string values; JSON where structured)
holds everything needed to rebuild the gated model. Both ``export`` (writing) and ``load`` (reading) use this."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from .. import __version__
from ..errors import FtwtError
from .meta import FORMAT_VERSION, RunMeta

__all__ = ["EXPORT_FORMAT", "EXPORT_FORMAT_VERSION", "export_metadata", "meta_from_export"]

EXPORT_FORMAT = "ftwt-export"
EXPORT_FORMAT_VERSION = 1
_GATE_KEYS = ("gated", "layers", "mode", "r", "gt", "decoupled")


def export_metadata(meta: RunMeta, evaluation: Optional[Dict[str, Any]]) -> Dict[str, str]:
    d = meta.to_dict()
    gate_config = {**{k: d["gating"][k] for k in _GATE_KEYS}, "plan": d["plan"]}
    for k in ("group_size", "fixed_open"):      # gates of channel groups, hybrid gates: written only when set
        if k in d["gating"]:
            gate_config[k] = d["gating"][k]
    return {
        "format": "pt",   # what transformers and timm write; safetensors readers look for it
        "ftwt_format": EXPORT_FORMAT, "ftwt_format_version": str(EXPORT_FORMAT_VERSION), "ftwt_version": __version__,
        "arch": json.dumps(d["arch"]), "source": json.dumps(d["source"]), "data_config": json.dumps(d["data_config"]),
        "gate_config": json.dumps(gate_config), "training": json.dumps(d["training"]), "evaluation": json.dumps(evaluation),
        "classes": json.dumps(d["classes"]), "environment": json.dumps(d["environment"]),
        **({"static": json.dumps(d["static"])} if d.get("static") else {}),
        **({"source_eval": json.dumps(d["source_eval"])} if d.get("source_eval") else {}),
    }


def meta_from_export(path: Path) -> RunMeta:
    """Rebuild the run metadata from an exported file's ``__metadata__``."""
    from safetensors import safe_open  # deferred: only safetensors files need it
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
        d = {"arch": json.loads(md["arch"]), "source": json.loads(md["source"]), "data_config": json.loads(md["data_config"]),
             "gating": {**{k: gate.get(k) for k in _GATE_KEYS},
                        **{k: gate[k] for k in ("group_size", "fixed_open") if k in gate}}, "plan": gate["plan"],
             "training": json.loads(md.get("training", "{}")), "evaluation": json.loads(md.get("evaluation", "null")),
             "classes": json.loads(md.get("classes", "null")), "environment": json.loads(md.get("environment", "{}")),
             "static": json.loads(md.get("static", "null")),
             "source_eval": json.loads(md.get("source_eval", "null")),
             "ftwt_version": md.get("ftwt_version", ""), "format": EXPORT_FORMAT, "format_version": FORMAT_VERSION}
    except (KeyError, json.JSONDecodeError) as e:
        raise FtwtError(f"{path} has incomplete ftwt metadata ({e})", "export it again with `ftwt export`") from None
    return RunMeta.from_dict(d, str(path))
