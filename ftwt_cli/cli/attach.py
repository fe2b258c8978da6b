"""``ftwt attach CHECKPOINT``: a thin wrapper over :func:`ftwt_cli.attach.attach`."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.table import Table
from typing_extensions import Annotated

from .application import command, console
from .options import Augment, Interpolation, value

if TYPE_CHECKING:
    from ..attach import AttachReport

__all__ = ["attach_cli", "print_attach_report"]


def _floats(text: Optional[str], flag: str) -> Optional[List[float]]:
    if text is None:
        return None
    from ..errors import FtwtError
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise FtwtError(f"{flag} {text} is not a comma-separated list of numbers", f"e.g. {flag} 0.485,0.456,0.406") from None



def print_attach_report(r: "AttachReport") -> None:
    from ..eval.report import fmt_macs as _g
    t = Table(title=f"gated layers of {r.arch} at {r.input_size[1]}×{r.input_size[2]}")
    for col, j in (("layer", "left"), ("C_in→C_out", "right"), ("kernel", "right"), ("groups", "right"),
                   ("dense MACs", "right"), ("gate MACs", "right")):
        t.add_column(col, justify=j)
    for l in r.layers:
        t.add_row(l.name, f"{l.in_channels}→{l.out_channels}", f"{l.kernel[0]}×{l.kernel[1]}", str(l.groups),
                  _g(l.dense_macs), f"{l.gate_macs:,}")
    gated = sum(l.dense_macs for l in r.layers)
    t.add_section()
    t.add_row(f"{len(r.layers)} gated layers", "", "", "", _g(gated), f"{r.gate_macs:,}")
    console.print(t)
    console.print(f"model: {r.arch} ({r.num_classes} classes, {r.in_chans} input channels, source format {r.source_format})")
    dc = r.data_config
    console.print(f"input: {dc.input_size[1]}×{dc.input_size[2]}, mean {tuple(round(v, 3) for v in dc.mean)}, std "
                  f"{tuple(round(v, 3) for v in dc.std)}, {dc.interpolation}, crop {dc.crop_pct}, augment {dc.augment} "
                  f"({r.input_source})", markup=False, highlight=False, soft_wrap=True)
    console.print(f"dense MACs (convs + linear, ptflops 'aten' convention): {_g(r.dense_macs)}; "
                  f"gated layers hold {gated / r.dense_macs:.1%}; gates add {r.gate_macs / r.dense_macs:.2%} when all run")
    if r.not_gated:
        console.print(f"not gated: {len(r.not_gated)} convs (" + "; ".join(f"{k}: {v}" for k, v in list(r.not_gated.items())[:3])
                      + (" …" if len(r.not_gated) > 3 else "") + ")", markup=False)
    if r.alternatives:
        console.print(f"note: the weights also fit {', '.join(r.alternatives)}; pass --arch to choose", markup=False)
    console.print(f"run written to {r.run_dir}", markup=False)


@command("attach")
def attach_cli(
    checkpoint: Annotated[Path, typer.Argument(help="State dict (.pth/.pt/.bin), timm/Lightning checkpoint, .safetensors, or hub folder.")],
    arch: Annotated[Optional[str], typer.Option(help="timm:NAME or torchvision:NAME (bare NAME tries both); detected when omitted.")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Expected number of classes (checked against the head).")] = None,
    in_chans: Annotated[Optional[int], typer.Option(help="Expected input channels (checked against the stem).")] = None,
    input_size: Annotated[Optional[str], typer.Option(help="C,H,W the model sees, e.g. 3,224,224.")] = None,
    mean: Annotated[Optional[str], typer.Option(help="Normalisation mean per channel, comma-separated.")] = None,
    std: Annotated[Optional[str], typer.Option(help="Normalisation std per channel, comma-separated.")] = None,
    interpolation: Annotated[Optional[Interpolation], typer.Option(help="Resize interpolation.", show_default="the checkpoint's, else the architecture's")] = None,
    crop_pct: Annotated[Optional[float], typer.Option(help="Evaluation center-crop fraction in (0, 1] (ImageNet-like images).",
                                                      show_default="the checkpoint's, else the architecture's")] = None,
    augment: Annotated[Optional[Augment], typer.Option(help="Training augmentation: small (pad-crop + flip), imagenet "
                                                            "(random-resized-crop + flip), none, auto (by the images' size).",
                                                       show_default="auto")] = None,
    run: Annotated[Path, typer.Option(help="Run directory to create.")] = Path("ftwt-run"),
    force: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    trust_pickle: Annotated[bool, typer.Option(help="Allow unpickling code (a whole saved nn.Module). Only for files you trust.")] = False,
    use_ema: Annotated[bool, typer.Option(help="Take the EMA weights of a timm train.py checkpoint.")] = False,
    include: Annotated[Optional[List[str]], typer.Option(help="Gate only layers matching this glob (repeatable).")] = None,
    exclude: Annotated[Optional[List[str]], typer.Option(help="Do not gate layers matching this glob (repeatable).")] = None,
    gate_shortcuts: Annotated[bool, typer.Option(help="Also gate 1×1 shortcut/downsample convs.")] = False,
) -> None:
    """Load a checkpoint, find its architecture and insert a decision gate before every gateable conv."""
    from ..attach import attach, parse_input_size
    report = attach(checkpoint, arch=arch, num_classes=num_classes, in_chans=in_chans,
                    input_size=parse_input_size(input_size), mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
                    run_dir=run, force=force, trust_pickle=trust_pickle, use_ema=use_ema,
                    include=include or (), exclude=exclude or (), gate_shortcuts=gate_shortcuts,
                    interpolation=value(interpolation), crop_pct=crop_pct, augment=value(augment))
    print_attach_report(report)
