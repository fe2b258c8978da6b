"""``ftwt export``: a thin wrapper over :func:`ftwt_cli.runs.export`."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from .application import command, console
from .options import Run

__all__ = ["export_cli"]

ExportFormat = Enum("ExportFormat", {"safetensors": "safetensors", "onnx": "onnx"}, type=str)


def _default_onnx(run: Path) -> Path:
    from ..formats.rundir import read_meta
    return run / "export" / f"{read_meta(run).arch.name}-ftwt.onnx"


@command("export")
def export_cli(
    run: Run = Path("ftwt-run"),
    out: Annotated[Optional[Path], typer.Option(help="Output file (default RUN/export/ARCH-ftwt.safetensors).")] = None,
    backbone_only: Annotated[bool, typer.Option(help="Write only the backbone as a plain state dict (.pth or .safetensors).")] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    fmt: Annotated[ExportFormat, typer.Option(
        "--format", help="safetensors (the gated model for ftwt_cli.load) or onnx (a graph for onnxruntime: a static twin as a "
                         "plain network, a gated run with its gates in the graph).")] = ExportFormat.safetensors,
    opset: Annotated[int, typer.Option(help="ONNX opset (--format onnx).")] = 17,
) -> None:
    """Write one portable .safetensors file (backbone + gates + metadata) and report.json/report.md beside it, or an ONNX graph."""
    if fmt == ExportFormat.onnx:
        from ..runs.onnx import export_onnx
        if backbone_only:
            from ..errors import FtwtError
            raise FtwtError("--backbone-only writes a state dict, not an ONNX graph", "drop --backbone-only, or --format onnx")
        o = export_onnx(run, out or _default_onnx(run), opset=opset, force=force)
        console.print(f"wrote {'gated' if o.gated else 'plain dense'} ONNX graph {o.path} (opset {o.opset}, "
                      f"{o.bytes / 1e6:.1f} MB, input (batch, {', '.join(map(str, o.input_size))}))"
                      + ("; the masks zero filters but onnxruntime still computes them (docs/export.md)" if o.gated else ""),
                      markup=False, highlight=False, soft_wrap=True)
        return
    from ..runs.exporter import export
    rep = export(run, out, backbone_only=backbone_only, force=force)
    what = "backbone state dict" if rep.backbone_only else "gated model"
    console.print(f"wrote {what} {rep.path} ({rep.tensors} tensors, {rep.bytes / 1e6:.1f} MB)"
                  + (f" and {', '.join(p.name for p in rep.report_files)} beside it" if rep.report_files else ""),
                  markup=False, highlight=False, soft_wrap=True)
    if not rep.backbone_only:
        console.print(f"load it with: ftwt_cli.load({str(rep.path)!r})", markup=False, highlight=False, soft_wrap=True)
