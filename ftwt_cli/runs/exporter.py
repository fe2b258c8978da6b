"""``ftwt export``: one portable .safetensors file holding backbone and gates, with everything needed to
rebuild the gated model in ``__metadata__`` (string values; JSON where structured), plus report files.

``--backbone-only`` instead writes the (fine-tuned) backbone as a plain state dict that timm/torchvision
load with ``load_state_dict``: .pth (torch.save) or .safetensors, by the file's suffix.
"""
from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .. import __version__
from ..errors import FtwtError
from ..formats.exported import export_metadata
from ..formats.meta import RunMeta
from ..formats.rundir import atomic_write_bytes, atomic_write_text, read_meta, save_weights
from .loader import load

__all__ = ["export", "ExportReport"]


@dataclass(frozen=True)
class ExportReport:
    path: Path
    backbone_only: bool
    tensors: int
    bytes: int
    report_files: tuple


def _deployed_report(run_dir: Path, meta: RunMeta) -> Optional[Dict[str, Any]]:
    """The run's report.json if it describes the model as exported: gates as the run deploys them ("predict" once
    fitted, else "open"). A report of another mode (``evaluate --gates oracle`` or ``--gates open`` after fitting) is
    not what the file computes, so it is not embedded."""
    rj = run_dir / "report.json"
    if not rj.is_file():
        return None
    rep = json.loads(rj.read_text())
    deployed = "predict" if meta.gating.mode == "predict" else "open"
    return rep if rep.get("gates") == deployed else None


def _evaluation(run_dir: Path, meta: RunMeta) -> Optional[Dict[str, Any]]:
    rep = _deployed_report(run_dir, meta)
    if rep is not None:
        return rep
    return dataclasses.asdict(meta.last_eval) if meta.last_eval is not None else None


def export(run_dir: Path | str = "ftwt-run", out: Optional[Path | str] = None, *, backbone_only: bool = False,
           force: bool = False) -> ExportReport:
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    name = meta.arch.name
    default = run_dir / "export" / (f"{name}-backbone.pth" if backbone_only else f"{name}-ftwt.safetensors")
    out = Path(out) if out is not None else default
    if out.exists() and not force:
        raise FtwtError(f"{out} already exists", "pass --force to replace it, or choose another --out")
    if out.is_dir():
        raise FtwtError(f"--out {out} is a folder", "pass a file path such as model.safetensors")
    if not backbone_only and out.suffix != ".safetensors":
        raise FtwtError(f"--out {out} must end in .safetensors", "e.g. --out resnet18-ftwt.safetensors")
    if not backbone_only:       # report.json / report.md go beside the file
        if out.parent.resolve() == run_dir.resolve():
            raise FtwtError(f"--out {out} would put the export's report files over the run's own evaluation report",
                            f"choose another folder, e.g. --out {run_dir / 'export' / out.name}")
        taken = [p.name for p in (out.parent / "report.json", out.parent / "report.md") if p.exists()]
        if taken and not force:
            raise FtwtError(f"{' and '.join(taken)} already exist beside --out {out}",
                            "pass --force to replace them, or choose another folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FtwtError(f"cannot create {out.parent} ({e.strerror})", "choose a writable --out") from None
    model = load(run_dir)
    if backbone_only:
        sd = model.backbone.state_dict()
        if out.suffix == ".safetensors":
            save_weights(out, sd, {"format": "pt"})
        else:
            buf = io.BytesIO()
            torch.save({k: v.detach().clone() for k, v in sd.items()}, buf)
            atomic_write_bytes(out, buf.getvalue())
        return ExportReport(out, True, len(sd), out.stat().st_size, ())
    evaluation = _evaluation(run_dir, meta)
    sd = model.state_dict()
    save_weights(out, sd, export_metadata(meta, evaluation))
    # report.json / report.md beside the file: the run's evaluation, or a summary of what is known
    g = meta.gating
    summary = {"file": out.name, "arch": dataclasses.asdict(meta.arch), "gating": {"r": g.r, "gt": g.gt, "mode": g.mode},
               "gated_layers": len(g.gated), "evaluation": evaluation, "ftwt_version": __version__}
    atomic_write_text(out.parent / "report.json", json.dumps(summary, indent=1))
    rmd = run_dir / "report.md"
    md = rmd.read_text() if rmd.is_file() and _deployed_report(run_dir, meta) is not None else _summary_md(summary)
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
