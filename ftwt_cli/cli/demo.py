"""``ftwt demo``: a thin wrapper over :func:`ftwt_cli.demo.run_demo`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from typing_extensions import Annotated

from .application import command, console
from .options import Amp, Device, Workers, value
from .progress import EpochProgress

__all__ = ["demo_cli"]


@command("demo", interrupted="interrupted: nothing is kept to continue from; `ftwt demo --force` starts over")
def demo_cli(
    dir: Annotated[Path, typer.Option(help="Folder for the baseline, the run and the export.")] = Path("ftwt-demo"),
    data: Annotated[Optional[str], typer.Option(help="fashion-mnist (default when installed) or digits.")] = None,
    workers: Workers = None,
    device: Device = "auto",
    amp: Amp = "auto",
    force: Annotated[bool, typer.Option(help="Replace an existing demo folder.")] = False,
) -> None:
    """Train a small baseline on a bundled dataset, then attach → fit-gates → finetune → evaluate → export."""
    from ..demo import run_demo
    from ..eval.report import fmt_macs
    res = run_demo(dir, data=data, force=force, workers=workers, device=device, amp=value(amp),
                   log=lambda s: console.print(s, markup=False, highlight=False), progress=EpochProgress())
    ev = res.report
    t = Table(title=f"ftwt demo: {ev.arch} on {ev.data} (test split, {ev.samples} images)")
    for c in ("", "top-1", "MACs per sample", "reduction"):
        t.add_column(c, justify="left" if not c else "right")
    t.add_row("before (the baseline checkpoint)", f"{res.baseline_top1:.2%}", fmt_macs(ev.dense_macs), "")
    t.add_row(f"after (gated, r={ev.r})", f"{ev.top1:.2%}", fmt_macs(ev.macs_mean), f"{ev.reduction:.1%}")
    console.print(t)
    console.print("time per step: " + ", ".join(f"{name} {sec:.0f} s" for name, sec in _labels(res.steps)),
                  markup=False, highlight=False, soft_wrap=True)
    console.print(f"done in {res.seconds:.0f}s: baseline {res.checkpoint}, run {res.run_dir}, export {res.exported}",
                  markup=False, highlight=False, soft_wrap=True)


def _labels(steps):
    """(short step name, seconds): "baseline", then each command's name."""
    for name, sec in steps:
        yield ("baseline" if name.startswith("training") else name.split(" ")[1]), sec
