"""``ftwt export``: a thin wrapper over :func:`ftwt_cli.runs.export`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from .application import command, console
from .options import Run

__all__ = ["export_cli"]


@command("export")
def export_cli(
    run: Run = Path("ftwt-run"),
    out: Annotated[Optional[Path], typer.Option(help="Output file (default RUN/export/ARCH-ftwt.safetensors).")] = None,
    backbone_only: Annotated[bool, typer.Option(help="Write only the backbone as a plain state dict (.pth or .safetensors).")] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
) -> None:
    """Write one portable .safetensors file (backbone + gates + metadata) and report.json/report.md beside it."""
    from ..runs.exporter import export
    rep = export(run, out, backbone_only=backbone_only, force=force)
    what = "backbone state dict" if rep.backbone_only else "gated model"
    console.print(f"wrote {what} {rep.path} ({rep.tensors} tensors, {rep.bytes / 1e6:.1f} MB)"
                  + (f" and {', '.join(p.name for p in rep.report_files)} beside it" if rep.report_files else ""),
                  markup=False, highlight=False, soft_wrap=True)
    if not rep.backbone_only:
        console.print(f"load it with: ftwt_cli.load({str(rep.path)!r})", markup=False, highlight=False, soft_wrap=True)
