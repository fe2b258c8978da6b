"""Training progress: a rich bar per epoch in a terminal, one plain line per epoch otherwise."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .application import console

if TYPE_CHECKING:
    from ..train import EpochStats

__all__ = ["EpochProgress", "print_epoch"]


def print_epoch(s: "EpochStats") -> None:
    extra = f" ce {s.ce:.3f}" if s.phase == "finetune" else ""
    console.print(f"{s.phase} epoch {s.epoch}: loss {s.loss:.3f}{extra} bce {s.bce:.3f} | agreement {s.agreement:.1%} "
                  f"keep {s.keep_ratio:.1%} MACs cut {s.macs_cut:.1%} (train) | val top-1 {s.val_top1:.2%} "
                  f"MACs cut {s.val_macs_cut:.1%} | {s.seconds:.0f}s", markup=False, highlight=False, soft_wrap=True)


class EpochProgress:
    def __init__(self) -> None:
        self.bar: Optional[Progress] = None
        self.task = None

    def start(self, phase: str, epoch: int, epochs: int, batches: int) -> None:
        if not console.is_terminal:
            return
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=console, transient=True)
        self.bar.start()
        self.label = f"{phase} {epoch}/{epochs}"
        self.task = self.bar.add_task(self.label, total=batches, metrics="")

    def step(self, done: int, a: Dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, metrics=f"loss {a['loss']:.3f} agree {a['agreement']:.1%} "
                                                               f"keep {a['keep']:.1%} cut {a['macs_cut']:.1%}")

    def validating(self) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=f"{self.label}: validating", metrics="")

    def note(self, text: str) -> None:
        console.print(f"note: {text}", markup=False, highlight=False, soft_wrap=True)

    def end(self, stats: "EpochStats") -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        print_epoch(stats)
