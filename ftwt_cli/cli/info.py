"""``ftwt info``: what a run or an exported file holds."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from typing_extensions import Annotated

from .application import command, console

__all__ = ["info_cli"]


def _read(path: Path):
    """The metadata alone (no model is built: torchvision and timm stay unimported, so info answers in a second or
    two); damaged files still fail with the loader's one-line errors."""
    from ..errors import FtwtError
    from ..formats.rundir import META_FILE, read_meta
    if path.is_file():
        from ..formats.exported import meta_from_export
        return meta_from_export(path)
    if path.is_dir() or not path.exists():
        return read_meta(path)
    raise FtwtError(f"{path} is neither a run directory nor an exported file",
                    f"pass a folder holding {META_FILE} or a .safetensors file")


@command("info")
def info_cli(path: Annotated[Path, typer.Argument(help="A run directory or an exported .safetensors file.")] = Path("ftwt-run"),
             json_out: Annotated[bool, typer.Option("--json", help="Print the metadata as JSON.")] = False) -> None:
    """Show what a run or exported file holds: architecture, gated layers, r, training history, last results."""
    from ..eval.report import fmt_macs
    meta = _read(path)
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
    t.add_row("input", f"{tuple(dc.input_size)}, mean {tuple(round(v, 3) for v in dc.mean)}, std "
                       f"{tuple(round(v, 3) for v in dc.std)}, interpolation {dc.interpolation}, crop {dc.crop_pct}")
    st = meta.static
    if st is not None and g.gated:
        t.add_row("hybrid", f"channels firing on few training images removed ({st.ratio:.1%} of the gated ones): "
                            f"{fmt_macs(st.macs)} MACs per sample with every gate open vs {fmt_macs(st.source_macs)} for "
                            f"its source; {sum(g.fixed_open.values())} channels of gated layers run without a gate")
    if st is not None and not g.gated:
        t.add_row("static twin", f"pruned with {st.importance} importance, {st.ratio:.1%} of each layer's channels removed: "
                                 f"{fmt_macs(st.macs)} MACs per sample vs {fmt_macs(st.source_macs)} for its source "
                                 f"({1 - st.macs / st.source_macs:.1%} cut); no gates")
    else:
        t.add_row("gated layers", f"{len(g.gated)} ({', '.join(g.gated[:4])}{', …' if len(g.gated) > 4 else ''})")
        t.add_row("gates", f"mode {g.mode}, r={g.r}, ground truth {g.gt}, {'decoupled' if g.decoupled else 'joint'}"
                  + (f", groups of {g.group_size} channels" if g.group_size > 1 else ""))
    se = meta.source_eval
    if se is not None:
        t.add_row("source checkpoint", f"top-1 {se.top1:.2%}, top-5 {se.top5:.2%} on {se.samples} {se.split} images of "
                                       f"{se.data} (before any training)")
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
    top1 = macs = None
    if e:
        top1, macs = e.get('top1', 0), e.get('macs_mean', e.get('macs', 0))
        label = f"last results ({e.get('gates', 'predict')} gates)" if e.get("gates") else "last results"
    elif meta.last_eval is not None:
        top1, macs, label = meta.last_eval.top1, meta.last_eval.macs, f"last results ({meta.last_eval.phase} validation)"
    if top1 is not None:
        base = st.source_macs if st is not None else (e or {}).get("dense_macs") or (meta.last_eval.dense_macs if meta.last_eval else 0)
        vs = f"; {(top1 - se.top1) * 100:+.2f} pt against the source checkpoint" if se is not None else ""
        t.add_row(label, f"top-1 {top1:.2%}{vs}, {fmt_macs(macs)} MACs per sample vs {fmt_macs(base)} for the source "
                         f"({1 - macs / base if base else 0:.1%} cut)")
    console.print(t)
