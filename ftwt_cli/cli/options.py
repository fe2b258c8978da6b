"""Option types shared by several commands, and the enums behind choice options (``--help`` lists their values and
typer refuses others before any slow work)."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ..settings import (
    AMP_MODES,
    AUGMENTS,
    FINETUNE_MODES,
    GATE_MODES,
    GT_RULE_NAMES,
    INTERPOLATIONS,
    SCHEDULES,
)

__all__ = ["GateMode", "GtRule", "FinetuneMode", "Schedule", "Interpolation", "Augment", "default_of", "config_option", "Run", "Workers", "Recipe",
           "Resume", "ValSplit", "TrainSamples", "Device", "Amp", "ChannelsLast", "DATA_HELP", "value", "DataOrRecipe", "data_arg", "int_list"]

DATA_HELP = "ImageFolder DIR, a CIFAR-10/100 folder, 'fashion-mnist' (or its idx folder), or 'digits'."


def _choices(name: str, values) -> type:
    """A str Enum of the library's own list of valid values (one source of truth), for typer."""
    return Enum(name, {v: v for v in values}, type=str)


GateMode = _choices("GateMode", GATE_MODES)                    # who decides the masks
GtRule = _choices("GtRule", GT_RULE_NAMES)                          # mass: smallest top-k reaching r; uniform: a fraction r
FinetuneMode = _choices("FinetuneMode", FINETUNE_MODES)
Schedule = _choices("Schedule", SCHEDULES)
Interpolation = _choices("Interpolation", INTERPOLATIONS)
Augment = _choices("Augment", AUGMENTS)                        # auto: by the images' size; small; imagenet


def default_of(cls, name: str) -> str:
    """The default of a config field as ``--help`` shows it (the option itself is None: a recipe may set it)."""
    import dataclasses
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    v = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return "machine's default" if v is None and name == "workers" else ("the run's" if v is None else str(v))


def config_option(cls, name: str, help: str):
    """A typer option for a config field whose ``--help`` shows the field's default; the option itself defaults to None,
    so that a recipe may set the field."""
    return typer.Option(help=help, show_default=default_of(cls, name))


def value(choice: Optional[Enum]) -> Optional[str]:
    """An enum option's string (None stays None: the recipe or the default decides)."""
    return None if choice is None else choice.value


DataOrRecipe = Annotated[Optional[str], typer.Option(help=DATA_HELP + " Default: the recipe's `data`.")]


def data_arg(data: Optional[str], recipe: Optional[dict]) -> str:
    """--data, else the recipe's ``data`` key; one of them is needed."""
    from ..errors import FtwtError
    chosen = data or (recipe or {}).get("data")
    if not chosen:
        raise FtwtError("no --data given" + (" and the recipe names none" if recipe else ""),
                        "pass --data DIR (or fashion-mnist, digits), or a recipe with a `data:` key")
    if not isinstance(chosen, str):
        raise FtwtError(f"the recipe's data={chosen!r} must be a string", "e.g. data: fashion-mnist")
    return chosen


def int_list(text: Optional[str], flag: str) -> Optional[list]:
    """"30,60" → [30, 60]."""
    from ..errors import FtwtError
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FtwtError(f"{flag} {text} is not a comma-separated list of epochs", f"e.g. {flag} 30,60") from None
Run = Annotated[Path, typer.Option(help="Run directory.")]
Workers = Annotated[Optional[int], typer.Option(min=0, help="DataLoader worker processes (default: 0 on a 2-core CPU, "
                                                             "else half the cores, at most 4).")]
Recipe = Annotated[Optional[Path], typer.Option(help="YAML recipe; flags override it.")]
ValSplit = Annotated[Optional[float], typer.Option(help="Hold out this fraction of DIR/CLASS images for validation.")]
TrainSamples = Annotated[Optional[int], typer.Option(help="Train on a fixed random subset of this many images.")]
Resume = Annotated[bool, typer.Option(help="Continue an interrupted run of this command from its last epoch.")]
Device = Annotated[str, typer.Option(help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N.")]
Amp = Annotated[_choices("Amp", AMP_MODES), typer.Option(
    help="Mixed precision: auto is bf16 on GPUs that have it, fp16 (with loss scaling) on older GPUs, off on the CPU.")]
ChannelsLast = Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last",
                                                      help="channels_last memory format.", show_default="on for CUDA")]
