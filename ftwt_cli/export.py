"""``ftwt export``: one portable .safetensors file holding backbone and gates, with everything needed to
rebuild the gated model in ``__metadata__`` (string values; JSON where structured), plus report files.

``--backbone-only`` instead writes the (fine-tuned) backbone as a plain state dict that timm/torchvision
load with ``load_state_dict``: .pth (torch.save) or .safetensors, by the file's suffix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from . import __version__
from .errors import FtwtError
from .model_io import load
from .run import atomic_write_bytes, atomic_write_text, read_meta, save_weights

__all__ = ["export", "ExportReport", "EXPORT_FORMAT", "EXPORT_FORMAT_VERSION", "export_metadata"]

EXPORT_FORMAT = "ftwt-export"
EXPORT_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ExportReport:
    path: Path
    backbone_only: bool
    tensors: int
    bytes: int
    report_files: tuple


def export_metadata(meta: Dict[str, Any], evaluation: Optional[Dict[str, Any]]) -> Dict[str, str]:
    g = meta["gating"]
    gate_config = {"gated": g["gated"], "layers": g.get("layers", []), "mode": g.get("mode"), "r": g.get("r"),
                   "gt": g.get("gt"), "decoupled": g.get("decoupled", True), "plan": meta["plan"]}
    return {
        "format": "pt",   # what transformers and timm write; safetensors readers look for it
        "ftwt_format": EXPORT_FORMAT, "ftwt_format_version": str(EXPORT_FORMAT_VERSION), "ftwt_version": __version__,
        "arch": json.dumps(meta["arch"]), "source": json.dumps(meta["source"]),
        "data_config": json.dumps(meta["data_config"]), "gate_config": json.dumps(gate_config),
        "training": json.dumps(meta.get("training", {})), "evaluation": json.dumps(evaluation),
    }


def _evaluation(run_dir: Path, meta: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    rj = run_dir / "report.json"
    if rj.is_file():
        return json.loads(rj.read_text())
    return meta.get("last_eval")


def export(run_dir: Path | str = "ftwt-run", out: Optional[Path | str] = None, *, backbone_only: bool = False,
           force: bool = False) -> ExportReport:
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    a = meta["arch"]
    default = run_dir / "export" / (f"{a['name']}-backbone.pth" if backbone_only else f"{a['name']}-ftwt.safetensors")
    out = Path(out) if out is not None else default
    if out.exists() and not force:
        raise FtwtError(f"{out} already exists", "pass --force to replace it, or choose another --out")
    if out.is_dir():
        raise FtwtError(f"--out {out} is a folder", "pass a file path such as model.safetensors")
    if not backbone_only and out.suffix != ".safetensors":
        raise FtwtError(f"--out {out} must end in .safetensors", "e.g. --out resnet18-ftwt.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = load(run_dir)
    if backbone_only:
        sd = model.backbone.state_dict()
        if out.suffix == ".safetensors":
            save_weights(out, sd, {"format": "pt"})
        else:
            import io
            buf = io.BytesIO()
            torch.save({k: v.detach().clone() for k, v in sd.items()}, buf)
            atomic_write_bytes(out, buf.getvalue())
        return ExportReport(out, True, len(sd), out.stat().st_size, ())
    evaluation = _evaluation(run_dir, meta)
    sd = model.state_dict()
    save_weights(out, sd, export_metadata(meta, evaluation))
    # report.json / report.md beside the file: the run's evaluation, or a summary of what is known
    summary = {"file": out.name, "arch": a, "gating": {k: meta["gating"].get(k) for k in ("r", "gt", "mode")},
               "gated_layers": len(meta["gating"]["gated"]), "evaluation": evaluation, "ftwt_version": __version__}
    atomic_write_text(out.parent / "report.json", json.dumps(summary, indent=1))
    rmd = run_dir / "report.md"
    md = rmd.read_text() if rmd.is_file() else _summary_md(summary)
    atomic_write_text(out.parent / "report.md", md)
    return ExportReport(out, False, len(sd), out.stat().st_size, (out.parent / "report.json", out.parent / "report.md"))


def _summary_md(s: Dict[str, Any]) -> str:
    e = s["evaluation"] or {}
    lines = [f"# {s['arch']['source']}:{s['arch']['name']} with ftwt gates", "",
             f"{s['gated_layers']} gated layers, r={s['gating']['r']}, ground truth {s['gating']['gt']}, gates {s['gating']['mode']}.", ""]
    if e:
        lines += [f"Last evaluation ({e.get('data', '?')}): top-1 {e.get('top1', 0):.2%}, "
                  f"{e.get('macs', 0) / 1e6:.2f} M MACs per sample against {e.get('dense_macs', 0) / 1e6:.2f} M dense "
                  f"({e.get('reduction', 0):.1%} cut).", ""]
    else:
        lines += ["Not evaluated yet: run `ftwt evaluate` before exporting to include results.", ""]
    return "\n".join(lines)
