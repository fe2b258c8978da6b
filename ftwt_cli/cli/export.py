"""``ftwt export``, ``ftwt info`` and ``ftwt demo``: thin wrappers over export.py, model_io.py and demo.py."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from typing_extensions import Annotated

from ..demo import run_demo
from ..export import export
from ..model_io import load
from ..report import fmt_macs as _m
from ._app import command, console
from ._progress import EpochProgress

__all__ = ["export_cli", "info_cli", "demo_cli"]



@command("export")
def export_cli(
    run: Annotated[Path, typer.Option(help="Run directory.")] = Path("ftwt-run"),
    out: Annotated[Optional[Path], typer.Option(help="Output file (default RUN/export/ARCH-ftwt.safetensors).")] = None,
    backbone_only: Annotated[bool, typer.Option(help="Write only the backbone as a plain state dict (.pth or .safetensors).")] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
) -> None:
    """Write one portable .safetensors file (backbone + gates + metadata) and report.json/report.md beside it."""
    rep = export(run, out, backbone_only=backbone_only, force=force)
    what = "backbone state dict" if rep.backbone_only else "gated model"
    console.print(f"wrote {what} {rep.path} ({rep.tensors} tensors, {rep.bytes / 1e6:.1f} MB)"
                  + (f" and {', '.join(p.name for p in rep.report_files)} beside it" if rep.report_files else ""),
                  markup=False, highlight=False, soft_wrap=True)
    if not rep.backbone_only:
        console.print(f"load it with: ftwt_cli.load({str(rep.path)!r})", markup=False, highlight=False, soft_wrap=True)


@command("info")
def info_cli(path: Annotated[Path, typer.Argument(help="A run directory or an exported .safetensors file.")] = Path("ftwt-run")) -> None:
    """Show what a run or exported file holds: architecture, gated layers, r, training history, last results."""
    m = load(path)
    meta, a, g = m.meta, m.meta["arch"], m.meta["gating"]
    t = Table(title=f"{path}", show_header=False)
    t.add_column(justify="right", style="bold")
    t.add_column()
    t.add_row("architecture", f"{a['source']}:{a['name']} ({a['num_classes']} classes, {a['in_chans']} input channels)")
    t.add_row("source", f"{meta['source'].get('path')} (sha256 {meta['source'].get('sha256', '')[:12]}…)")
    dc = meta["data_config"]
    t.add_row("input", f"{tuple(dc['input_size'])}, mean {tuple(round(v, 3) for v in dc['mean'])}, interpolation {dc['interpolation']}")
    t.add_row("gated layers", f"{len(g['gated'])} ({', '.join(g['gated'][:4])}{', …' if len(g['gated']) > 4 else ''})")
    t.add_row("gates", f"mode {g.get('mode')}, r={g.get('r')}, ground truth {g.get('gt')}, {'decoupled' if g.get('decoupled', True) else 'joint'}")
    for phase, tr in meta.get("training", {}).items():
        eps = tr.get("epochs", [])
        last = eps[-1] if eps else {}
        t.add_row(phase, f"{len(eps)} epochs on {tr.get('data')}; last: val top-1 {last.get('val_top1', 0):.2%}, "
                         f"MACs cut {last.get('val_macs_cut', 0):.1%}")
    e = meta.get("evaluation") or meta.get("last_eval")
    if e:
        t.add_row("last results", f"top-1 {e.get('top1', 0):.2%}, {_m(e.get('macs_mean', e.get('macs', 0)))} MACs per sample "
                                  f"vs {_m(e.get('dense_macs', 0))} dense ({e.get('reduction', 0):.1%} cut)")
    console.print(t)


@command("demo")
def demo_cli(
    dir: Annotated[Path, typer.Option(help="Folder for the baseline, the run and the export.")] = Path("ftwt-demo"),
    data: Annotated[Optional[str], typer.Option(help="fashion-mnist (default when installed) or digits.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=0, help="DataLoader worker processes (default: 0 on a 2-core CPU, else half the cores, at most 4).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing demo folder.")] = False,
) -> None:
    """Train a small baseline on a bundled dataset, then attach → fit-gates → finetune → evaluate → export."""
    res = run_demo(dir, data=data, force=force, workers=workers,
                   log=lambda s: console.print(s, markup=False, highlight=False), progress=EpochProgress())
    ev = res.report
    t = Table(title=f"ftwt demo: {ev.arch} on {ev.data} (test split, {ev.samples} images)")
    for c in ("", "top-1", "MACs per sample", "reduction"):
        t.add_column(c, justify="left" if not c else "right")
    t.add_row("before (the baseline checkpoint)", f"{res.baseline_top1:.2%}", _m(ev.dense_macs), "")
    t.add_row(f"after (gated, r={ev.r})", f"{ev.top1:.2%}", _m(ev.macs_mean), f"{ev.reduction:.1%}")
    console.print(t)
    console.print(f"done in {res.seconds:.0f}s: baseline {res.checkpoint}, run {res.run_dir}, export {res.exported}",
                  markup=False, highlight=False, soft_wrap=True)
