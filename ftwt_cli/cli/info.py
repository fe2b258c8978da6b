"""``ftwt info``: what a run or an exported file holds."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from typing_extensions import Annotated

from .application import command, console

__all__ = ["info_cli"]


@command("info")
def info_cli(path: Annotated[Path, typer.Argument(help="A run directory or an exported .safetensors file.")] = Path("ftwt-run"),
             json_out: Annotated[bool, typer.Option("--json", help="Print the metadata as JSON.")] = False) -> None:
    """Show what a run or exported file holds: architecture, gated layers, r, training history, last results."""
    from ..eval.report import fmt_macs as _m
    from ..io.load import load
    meta = load(path).meta
    if json_out:
        import json
        console.print_json(json.dumps(meta.to_dict()))
        return
    a, g, dc = meta.arch, meta.gating, meta.data_config
    t = Table(title=f"{path}", show_header=False)
    t.add_column(justify="right", style="bold")
    t.add_column()
    t.add_row("architecture", f"{a} ({a.num_classes} classes, {a.in_chans} input channels)")
    t.add_row("source", f"{meta.source.path} (sha256 {meta.source.sha256[:12]}…)")
    t.add_row("input", f"{tuple(dc.input_size)}, mean {tuple(round(v, 3) for v in dc.mean)}, interpolation {dc.interpolation}")
    t.add_row("gated layers", f"{len(g.gated)} ({', '.join(g.gated[:4])}{', …' if len(g.gated) > 4 else ''})")
    t.add_row("gates", f"mode {g.mode}, r={g.r}, ground truth {g.gt}, {'decoupled' if g.decoupled else 'joint'}")
    if meta.classes:
        t.add_row("classes", f"{len(meta.classes)} ({', '.join(meta.classes[:5])}{', …' if len(meta.classes) > 5 else ''})")
    if meta.environment:
        e = meta.environment
        t.add_row("written with", f"ftwt {e.get('ftwt')}, torch {e.get('torch')}, torchvision {e.get('torchvision')}, "
                                  f"timm {e.get('timm')} on {e.get('device')}")
    for phase, tr in meta.training.items():
        last = tr.epochs[-1] if tr.epochs else {}
        t.add_row(phase, f"{len(tr.epochs)} epochs on {tr.data}; last: val top-1 {last.get('val_top1', 0):.2%}, "
                         f"MACs cut {last.get('val_macs_cut', 0):.1%}")
    e = meta.evaluation
    if e:
        t.add_row("last results", f"top-1 {e.get('top1', 0):.2%}, {_m(e.get('macs_mean', e.get('macs', 0)))} MACs per sample "
                                  f"vs {_m(e.get('dense_macs', 0))} dense ({e.get('reduction', 0):.1%} cut)")
    elif meta.last_eval is not None:
        le = meta.last_eval
        t.add_row("last results", f"top-1 {le.top1:.2%}, {_m(le.macs)} MACs per sample vs {_m(le.dense_macs)} dense "
                                  f"({le.reduction:.1%} cut)")
    console.print(t)
