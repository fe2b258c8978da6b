"""Option types shared by several commands, and the enums behind choice options (``--help`` lists their values and
typer refuses others before any slow work)."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from ..settings import (
    AMP_MODES,
    AUGMENTS,
    FINETUNE_MODES,
    GATE_MODES,
    GROUP_ORDERS,
    GT_RULE_NAMES,
    INTERPOLATIONS,
    SCHEDULES,
    STATIC_IMPORTANCES,
)

__all__ = ["GateMode", "GroupOrder", "GroupSize", "GtRule", "FinetuneMode", "Schedule", "Interpolation", "Augment", "default_of", "config_option", "Run", "Workers", "Recipe",
           "Resume", "ValSplit", "TrainSamples", "Device", "Amp", "ChannelsLast", "DATA_HELP", "value", "DataOrRecipe", "data_arg", "int_list",
           "float_list", "Arch", "NumClasses", "InChans", "InputSize", "Mean", "Std", "InterpolationOpt", "CropPct", "AugmentOpt",
           "TrustPickle", "UseEma", "Include", "Exclude", "GateShortcuts", "DepthwiseFollow", "ResidualStream", "attach_options", "StaticImportance",
           "NoSourceCheck"]

DATA_HELP = "ImageFolder DIR, a CIFAR-10/100 folder, 'fashion-mnist' (or its idx folder), or 'digits'."


def _choices(name: str, values) -> type:
    """A str Enum of the library's own list of valid values (one source of truth), for typer."""
    return Enum(name, {v: v for v in values}, type=str)


GateMode = _choices("GateMode", GATE_MODES)                    # who decides the masks
GroupOrder = _choices("GroupOrder", GROUP_ORDERS)             # cofire: channels that fire together share a group
GtRule = _choices("GtRule", GT_RULE_NAMES)                          # mass: smallest top-k reaching r; uniform: a fraction r
FinetuneMode = _choices("FinetuneMode", FINETUNE_MODES)
Schedule = _choices("Schedule", SCHEDULES)
Interpolation = _choices("Interpolation", INTERPOLATIONS)
Augment = _choices("Augment", AUGMENTS)                        # auto: by the images' size; small; imagenet
StaticImportance = _choices("StaticImportance", STATIC_IMPORTANCES)   # Torch-Pruning's filter importance


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


DataOrRecipe = Annotated[Optional[str], typer.Option(help=DATA_HELP + " Default: the recipe's `data`, else the run's.")]
NoSourceCheck = Annotated[bool, typer.Option(
    "--no-source-check", help="Do not stop when the source checkpoint scores near chance on the first data (a model that really is that weak).")]


def data_arg(data: Optional[str], recipe: Optional[dict], run: Optional[Path] = None) -> str:
    """--data, else the recipe's ``data`` key, else the data the run was last trained on (``runs.defaults``)."""
    from ..runs.defaults import default_data
    return default_data(data, recipe, run)


def int_list(text: Optional[str], flag: str) -> Optional[list]:
    """"30,60" → [30, 60]."""
    from ..errors import FtwtError
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FtwtError(f"{flag} {text} is not a comma-separated list of epochs", f"e.g. {flag} 30,60") from None
def float_list(text: Optional[str], flag: str, example: str = "0.485,0.456,0.406") -> Optional[list]:
    """"0.9,0.8" → [0.9, 0.8]."""
    from ..errors import FtwtError
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FtwtError(f"{flag} {text} is not a comma-separated list of numbers", f"e.g. {flag} {example}") from None


# attach's options: what `ftwt attach` and `ftwt sweep` take to read the user's checkpoint
Arch = Annotated[Optional[str], typer.Option(help="timm:NAME or torchvision:NAME (bare NAME tries both); detected when omitted.")]
NumClasses = Annotated[Optional[int], typer.Option(help="Expected number of classes (checked against the head).")]
InChans = Annotated[Optional[int], typer.Option(help="Expected input channels (checked against the stem).")]
InputSize = Annotated[Optional[str], typer.Option(help="C,H,W the model sees, e.g. 3,224,224.")]
Mean = Annotated[Optional[str], typer.Option(help="Normalisation mean per channel, comma-separated.")]
Std = Annotated[Optional[str], typer.Option(help="Normalisation std per channel, comma-separated.")]
InterpolationOpt = Annotated[Optional[Interpolation], typer.Option(help="Resize interpolation.",
                                                                   show_default="the checkpoint's, else the architecture's")]
CropPct = Annotated[Optional[float], typer.Option(help="Evaluation center-crop fraction in (0, 1] (ImageNet-like images).",
                                                  show_default="the checkpoint's, else the architecture's")]
AugmentOpt = Annotated[Optional[Augment], typer.Option(help="Training augmentation: small (pad-crop + flip), imagenet "
                                                            "(random-resized-crop + flip), none, auto (by the images' size).",
                                                       show_default="auto")]
TrustPickle = Annotated[bool, typer.Option(help="Allow unpickling code (a whole saved nn.Module). Only for files you trust.")]
UseEma = Annotated[bool, typer.Option(help="Take the EMA weights of a timm train.py checkpoint.")]
Include = Annotated[Optional[List[str]], typer.Option(help="Gate only layers matching this glob (repeatable).")]
Exclude = Annotated[Optional[List[str]], typer.Option(help="Do not gate layers matching this glob (repeatable).")]
GateShortcuts = Annotated[bool, typer.Option(help="Also gate 1×1 shortcut/downsample convs.")]
DepthwiseFollow = Annotated[bool, typer.Option(help="A depthwise conv reading a gated unit's output takes that unit's mask "
                                                    "instead of a gate of its own (inverted residuals), so its masked channels "
                                                    "are zero for the conv after it.")]

ResidualStream = Annotated[bool, typer.Option(help="Gate each residual block's output after its add (FTWT's --gtafterblock) "
                                                   "instead of the conv before the add, so the next block's convs read a "
                                                   "sparse stream (ResNet-style blocks).")]

GroupSize = Annotated[int, typer.Option(help="Channels per gate decision: 1 gates each channel; 8/16/32 gate aligned groups "
                                             "(fit-gates first orders channels so that those that fire together share a "
                                             "group; a layer's last group holds the remainder).")]


def attach_options(*, arch, num_classes, in_chans, input_size, mean, std, interpolation, crop_pct, augment, trust_pickle,
                   use_ema, include, exclude, gate_shortcuts, depthwise_follow=False, group_size=1,
                   residual_stream=False):
    """attach's flags, parsed, as the one ``AttachOptions`` that ``ftwt attach`` and ``ftwt sweep`` pass on."""
    from ..attach import AttachOptions, parse_input_size
    mean, std = float_list(mean, "--mean"), float_list(std, "--std")
    return AttachOptions(arch=arch, num_classes=num_classes, in_chans=in_chans, input_size=parse_input_size(input_size),
                         mean=tuple(mean) if mean else None, std=tuple(std) if std else None,
                         interpolation=value(interpolation), crop_pct=crop_pct, augment=value(augment),
                         trust_pickle=trust_pickle, use_ema=use_ema, include=tuple(include or ()),
                         exclude=tuple(exclude or ()), gate_shortcuts=gate_shortcuts, depthwise_follow=depthwise_follow,
                         group_size=group_size, residual_stream=residual_stream)


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
