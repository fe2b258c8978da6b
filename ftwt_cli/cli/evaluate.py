"""``ftwt evaluate``: accuracy, exact dynamic MACs and OOD behaviour of a run (wraps :func:`ftwt_cli.evaluate.evaluate_run`)."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from typing_extensions import Annotated

from .application import command, console
from .options import DATA_HELP, Amp, ChannelsLast, Device, GateMode, NoSourceCheck, Run, Workers, value

if TYPE_CHECKING:
    from ..eval.run import EvalReport

__all__ = ["evaluate_cli", "print_eval_report"]


def print_eval_report(rep: "EvalReport") -> None:
    from ..eval.report import changes, diagnostics, fmt_macs, ood_summary
    src1 = f"{rep.source_top1:.2%}" if rep.source_top1 is not None else "–"
    src5 = f"{rep.source_top5:.2%}" if rep.source_top5 is not None else "–"
    t = Table(title=f"{rep.arch} on {rep.data} ({rep.samples} images), "
                    + ("statically pruned" if rep.static else f"gates {rep.gates}" + (f" r={rep.r}" if rep.r else "")))
    t.add_column("")
    t.add_column("this model" if rep.static else "gated", justify="right")
    if not rep.static:
        t.add_column("this run, gates open", justify="right")
    t.add_column("source checkpoint", justify="right")

    def row(label, gated, run_open, source):
        t.add_row(label, gated, source) if rep.static else t.add_row(label, gated, run_open, source)
    row("top-1", f"{rep.top1:.2%}", f"{rep.top1_open:.2%}", src1)
    row("top-5", f"{rep.top5:.2%}", f"{rep.top5_open:.2%}", src5)
    row("MACs / sample", fmt_macs(rep.macs_mean), fmt_macs(rep.dense_macs), fmt_macs(rep.static_source_macs or rep.dense_macs))
    if not rep.static:
        row("MACs p10 / p50 / p90", f"{fmt_macs(rep.macs_p10)} / {fmt_macs(rep.macs_p50)} / {fmt_macs(rep.macs_p90)}", "", "")
    row("reduction", f"{rep.cut_vs_source:.1%}", "", "")
    if not rep.static:
        row("gate overhead", f"{fmt_macs(rep.gate_macs)} ({rep.gate_macs / rep.dense_macs:.2%})", "", "")
        row("mean keep ratio", f"{rep.keep_mean:.1%}", "100%", "100%")
    console.print(t)
    for c in changes(rep):
        console.print(f"accuracy change {c}", markup=False, highlight=False, soft_wrap=True)
    for line in diagnostics(rep):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if rep.ood:
        o = Table(title="out of distribution (mean over severities)")
        for c in ("shift", "top-1 gated", "top-1 open", "Δ pt", "MACs", "MACs change", "keep change pt"):
            o.add_column(c, justify="left" if c == "shift" else "right", no_wrap=c == "shift")
        for d in ood_summary(rep):
            o.add_row(d["shift"], f"{d['top1_gated']:.2%}", f"{d['top1_open']:.2%}", f"{d['gated_minus_open'] * 100:+.2f}",
                      fmt_macs(d["macs"]), f"{d['macs_change']:+.1%}", f"{d['keep_change'] * 100:+.1f}")
        console.print(o)


class _Stages:
    """One bar for the current evaluation pass, named "pass k of N" when the number of passes is known (``--ood``:
    every corruption and severity twice, gated and open), above one bar for all the passes' images together; on a
    terminal only. Elsewhere (a CI log, a pipe) a line as each pass begins, so a long run is never silent."""

    def __init__(self, progress: Optional[Progress], passes: Optional[int] = None) -> None:
        self.progress, self.task, self.passes, self.done, self.overall = progress, None, passes, 0, None

    def __call__(self, label: str, total: int):
        self.done += 1
        name = f"pass {self.done} of {self.passes}: {label}" if self.passes else label
        if self.progress is None:
            if self.passes:
                console.print(name, markup=False, highlight=False)
            return None
        if self.task is not None:
            self.progress.remove_task(self.task)
        if self.passes and self.overall is None:
            self.overall = self.progress.add_task("all passes", total=self.passes)
        elif self.overall is not None:
            self.progress.update(self.overall, advance=1)
        self.task = self.progress.add_task(name, total=total)
        return lambda n: self.progress.update(self.task, advance=n)


def _passes(gates: str, ood: bool, corruption, ood_data, meta, frozen_bn: bool = True) -> Optional[int]:
    """How many evaluation passes a run of `ftwt evaluate` makes (None when it is one or two: no overall bar)."""
    from ..eval.ood import DEFAULT_CORRUPTIONS
    from ..eval.source import to_measure
    if not (ood or corruption or ood_data):
        return None
    # predict: + the frozen masks (and the pass that re-estimates BatchNorm under them)
    n = (1 if gates == "open" else 2) + to_measure(meta) + (gates == "predict") * (1 + frozen_bn)
    n += 2 * len(tuple(corruption or ()) or DEFAULT_CORRUPTIONS) * 5 if (ood or corruption) else 0
    return n + (2 if ood_data else 0)


@command("evaluate")
def evaluate_cli(
    data: Annotated[Optional[str], typer.Option(help=DATA_HELP + " Default: the data the run was trained on.")] = None,
    gates: Annotated[GateMode, typer.Option(help="Who decides the masks; oracle gives the r rule's reduction before training.")] = GateMode.predict,
    r: Annotated[Optional[float], typer.Option(help="r for --gates oracle (and for the agreement of predicted gates).")] = None,
    target_cut: Annotated[Optional[float], typer.Option(
        help="With --gates oracle, instead of --r: the r whose oracle masks cut this share of MACs on --calib-samples training images.")] = None,
    calib_samples: Annotated[int, typer.Option(min=1, help="Training images --target-cut is measured on.")] = 2048,
    frozen_bn_images: Annotated[int, typer.Option(min=0, help=(
        "Training images the frozen majority mask's BatchNorm statistics are re-estimated on before it is scored "
        "(0: score it with the run's own, estimated under the gates' masks)."))] = 2048,
    ood: Annotated[bool, typer.Option(help="Also evaluate under ImageNet-C-style corruptions at severities 1-5.")] = False,
    corruption: Annotated[Optional[List[str]], typer.Option(help="Only these corruptions (repeatable); implies --ood.")] = None,
    ood_data: Annotated[Optional[str], typer.Option(help="Another dataset with the same classes.")] = None,
    ood_samples: Annotated[int, typer.Option(min=0, help="Images per corruption and severity (0 = the whole split).")] = 2000,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size.")] = 256,
    workers: Workers = None,
    device: Device = "auto",
    amp: Amp = "auto",
    channels_last: ChannelsLast = None,
    no_source_check: NoSourceCheck = False,
    run: Run = Path("ftwt-run"),
) -> None:
    """Report accuracy, exact dynamic MACs, gate behaviour and (with --ood) robustness; writes report.* into the run."""
    from ..eval.command import evaluate_and_report
    from ..formats.rundir import read_meta
    from ..runtime.dist import launched_rank
    main = launched_rank() == 0                         # under torchrun, rank 0 alone prints
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True) if console.is_terminal and main else None
    passes = _passes(gates.value, ood, corruption, ood_data, read_meta(run), frozen_bn_images > 0)
    with (progress or nullcontext()):
        rep, files = evaluate_and_report(
            run, data, gates=gates.value, r=r, ood=ood, ood_data=ood_data, corruptions=corruption or (),
            ood_samples=ood_samples or None, batch_size=batch_size, workers=workers, on_stage=_Stages(progress, passes),
            device=device, amp=value(amp), channels_last=channels_last, target_cut=target_cut,
            calib_samples=calib_samples, check_source=not no_source_check, frozen_bn_images=frozen_bn_images)
    if not main:
        return
    for n in rep.notes:
        console.print(f"note: {n}", markup=False, highlight=False, soft_wrap=True)
    print_eval_report(rep)
    console.print(f"wrote {', '.join(p.name for p in files)} into {run}", markup=False, highlight=False, soft_wrap=True)
