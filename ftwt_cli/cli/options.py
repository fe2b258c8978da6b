"""Option types shared by several commands, and the enums behind choice options (``--help`` lists their values and
typer refuses others before any slow work)."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

__all__ = ["GateMode", "GtRule", "FinetuneMode", "Schedule", "Data", "Run", "Workers", "Seed", "BatchSize", "Recipe",
           "Resume", "ValSplit", "TrainSamples", "DATA_HELP", "value"]

DATA_HELP = "ImageFolder DIR, a CIFAR-10/100 folder, 'fashion-mnist' (or its idx folder), or 'digits'."


class GateMode(str, Enum):
    open = "open"
    predict = "predict"
    oracle = "oracle"


class GtRule(str, Enum):
    mass = "mass"          # heatmap mass: the smallest top-k reaching r of the mass
    uniform = "uniform"    # a fixed fraction r of the channels


class FinetuneMode(str, Enum):
    decoupled = "decoupled"
    joint = "joint"


class Schedule(str, Enum):
    cosine = "cosine"
    step = "step"
    constant = "constant"


def value(choice: Optional[Enum]) -> Optional[str]:
    """An enum option's string (None stays None: the recipe or the default decides)."""
    return None if choice is None else choice.value


Data = Annotated[str, typer.Option(help=DATA_HELP)]
Run = Annotated[Path, typer.Option(help="Run directory.")]
Workers = Annotated[Optional[int], typer.Option(min=0, help="DataLoader worker processes (default: 0 on a 2-core CPU, "
                                                             "else half the cores, at most 4).")]
Seed = Annotated[Optional[int], typer.Option(help="Seed for shuffling and augmentation.")]
BatchSize = Annotated[Optional[int], typer.Option(help="Batch size.")]
Recipe = Annotated[Optional[Path], typer.Option(help="YAML recipe; flags override it.")]
ValSplit = Annotated[Optional[float], typer.Option(help="Hold out this fraction of DIR/CLASS images for validation.")]
TrainSamples = Annotated[Optional[int], typer.Option(help="Train on a fixed random subset of this many images.")]
Resume = Annotated[bool, typer.Option(help="Continue an interrupted run of this command from its last epoch.")]
