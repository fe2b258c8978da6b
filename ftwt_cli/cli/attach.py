"""``ftwt attach CHECKPOINT``: a thin wrapper over :func:`ftwt_cli.attach.attach`."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table
from typing_extensions import Annotated

from .application import command, console
from .options import (
    Arch,
    AugmentOpt,
    CropPct,
    DepthwiseFollow,
    Exclude,
    GateShortcuts,
    GroupSize,
    InChans,
    Include,
    InputSize,
    InterpolationOpt,
    Mean,
    NumClasses,
    ResidualStream,
    Std,
    TrustPickle,
    UseEma,
    attach_options,
)

if TYPE_CHECKING:
    from ..attach import AttachReport

__all__ = ["attach_cli", "print_attach_report", "choice_notes"]


def print_attach_report(r: "AttachReport") -> None:
    from ..attach import LOW_GATEABLE_SHARE
    from ..eval.report import fmt_macs
    t = Table(title=f"gated layers of {r.arch} at {r.input_size[1]}×{r.input_size[2]}")
    for col, j in (("layer", "left"), ("C_in→C_out", "right"), ("kernel", "right"), ("groups", "right"),
                   ("dense MACs", "right"), ("gate MACs", "right")):
        t.add_column(col, justify=j)
    for l in r.layers:
        t.add_row(l.name, f"{l.in_channels}→{l.out_channels}", {"mlp": "MLP", "glu": "GLU MLP", "stream": "block out"}.get(l.kind, f"{l.kernel[0]}×{l.kernel[1]}"), str(l.groups),
                  fmt_macs(l.dense_macs), f"{l.gate_macs:,}")
    gated = sum(l.dense_macs for l in r.layers)
    t.add_section()
    t.add_row(f"{len(r.layers)} gated layers", "", "", "", fmt_macs(gated), f"{r.gate_macs:,}")
    console.print(t)
    console.print(f"model: {r.arch} ({r.num_classes} classes, {r.in_chans} input channels, source format {r.source_format})")
    dc = r.data_config
    console.print(f"input: {dc.input_size[1]}×{dc.input_size[2]}, mean {tuple(round(v, 3) for v in dc.mean)}, std "
                  f"{tuple(round(v, 3) for v in dc.std)}, {dc.interpolation}, crop {dc.crop_pct}, augment {dc.augment} "
                  f"({r.input_source})", markup=False, highlight=False, soft_wrap=True)
    mlp_note = " (an MLP unit: fc1 and fc2)" if any(l.kind in ("mlp", "glu") for l in r.layers) else ""
    if any(l.kind == "stream" for l in r.layers):
        mlp_note += " (a block's output: the convs feeding its sum)"
    if r.input_source == "the architecture's reference config":
        console.print(f"note: the checkpoint states no input config, so the architecture's reference one applies "
                      f"({dc.input_size[1]}×{dc.input_size[2]}, mean {tuple(round(v, 3) for v in dc.mean)}); if the "
                      f"model was trained otherwise, re-attach with --input-size/--mean/--std (the first command on data "
                      f"checks the source's accuracy)", markup=False, highlight=False, soft_wrap=True)
    console.print(f"dense MACs (convs, linear layers and attention products, ptflops 'aten' convention): {fmt_macs(r.dense_macs)}; "
                  f"gated layers hold {gated / r.dense_macs:.1%}{mlp_note}; gates add "
                  f"{r.gate_macs / r.dense_macs:.2%} when all run", markup=False, highlight=False, soft_wrap=True)
    if r.group_size > 1:
        short = r.short_groups
        console.print(f"gates decide per group of {r.group_size} channels"
                      + (f"; the last group is shorter where {r.group_size} does not divide a layer ({len(short)} layers, e.g. "
                         + ", ".join(f"{k}: {v}" for k, v in list(short.items())[:3]) + ")" if short else ""),
                      markup=False, highlight=False, soft_wrap=True)
    if r.gated_share < LOW_GATEABLE_SHARE:
        console.print(f"note: only {r.gated_share:.0%} of the MACs are in gateable layers (the rest, e.g. attention or gated "
                      f"GLU MLPs, stays dense), so gating can save at most that", markup=False, highlight=False, soft_wrap=True)
    if r.not_gated:
        console.print(f"not gated: {len(r.not_gated)} layers (" + "; ".join(f"{k}: {v}" for k, v in list(r.not_gated.items())[:3])
                      + (" …" if len(r.not_gated) > 3 else "") + ")", markup=False)
    if r.alternatives:
        for line in choice_notes(r):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(f"run written to {r.run_dir}", markup=False)


def choice_notes(r: "AttachReport") -> list:
    """What was chosen among several architectures that take the weights, why, and the --arch that picks another."""
    lines = [f"note: chose {r.arch}" + (f" ({r.choice_rule})" if r.choice_rule else "")]
    if r.other_functions:
        lines.append(f"note: the weights also fit {', '.join(r.other_functions)}, which compute another function; "
                     f"pass --arch {r.other_functions[0]} (or another of them) if the checkpoint is one of those")
    same = [a for a in r.alternatives if a not in r.other_functions]
    pre = [a for a in same if a in r.other_preprocessing]
    if [a for a in same if a not in pre]:
        lines.append(f"note: {', '.join(a for a in same if a not in pre)} compute the same function with the same "
                     "preprocessing: nothing changes with them")
    if pre:
        lines.append(f"note: {', '.join(pre)} compute{'s' if len(pre) == 1 else ''} the same function but "
                     f"expect{'s' if len(pre) == 1 else ''} other preprocessing (mean/std, size or crop), which changes "
                     f"the results: pass --arch {pre[0]} to use it, or set --mean/--std/--input-size")
    return lines


@command("attach")
def attach_cli(
    checkpoint: Annotated[Path, typer.Argument(help="State dict (.pth/.pt/.bin), timm/Lightning checkpoint, .safetensors, or hub folder.")],
    arch: Arch = None,
    num_classes: NumClasses = None,
    in_chans: InChans = None,
    input_size: InputSize = None,
    mean: Mean = None,
    std: Std = None,
    interpolation: InterpolationOpt = None,
    crop_pct: CropPct = None,
    augment: AugmentOpt = None,
    run: Annotated[Path, typer.Option(help="Run directory to create.")] = Path("ftwt-run"),
    force: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    trust_pickle: TrustPickle = False,
    use_ema: UseEma = False,
    include: Include = None,
    exclude: Exclude = None,
    gate_shortcuts: GateShortcuts = False,
    depthwise_follow: DepthwiseFollow = False,
    residual_stream: ResidualStream = False,
    group_size: GroupSize = 1,
) -> None:
    """Load a checkpoint, find its architecture and insert a decision gate before every gateable conv."""
    from ..attach import attach
    report = attach(checkpoint, attach_options(
        arch=arch, num_classes=num_classes, in_chans=in_chans, input_size=input_size, mean=mean, std=std,
        interpolation=interpolation, crop_pct=crop_pct, augment=augment, trust_pickle=trust_pickle, use_ema=use_ema,
        include=include, exclude=exclude, gate_shortcuts=gate_shortcuts,
        depthwise_follow=depthwise_follow, group_size=group_size, residual_stream=residual_stream), run_dir=run, force=force)
    print_attach_report(report)
