"""``ftwt sweep CHECKPOINT``: dynamic points, their static twins and the dense control, each a run under --out
(thin wrapper over :func:`ftwt_cli.sweep.run_sweep`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from .application import command, console
from .options import (
    Amp,
    Arch,
    AugmentOpt,
    CropPct,
    DataOrRecipe,
    DepthwiseFollow,
    Device,
    Exclude,
    GateShortcuts,
    GroupSize,
    InChans,
    Include,
    InputSize,
    InterpolationOpt,
    Mean,
    NoSourceCheck,
    NumClasses,
    Recipe,
    ResidualStream,
    StaticImportance,
    Std,
    TrainSamples,
    TrustPickle,
    UseEma,
    ValSplit,
    Workers,
    attach_options,
    data_arg,
    float_list,
    value,
)
from .progress import EpochProgress

__all__ = ["sweep_cli"]


@command("sweep")
def sweep_cli(
    checkpoint: Annotated[Path, typer.Argument(help="The source checkpoint, as for `ftwt attach`.")],
    data: DataOrRecipe = None,
    rs: Annotated[Optional[str], typer.Option(help="Dynamic points at these r, comma-separated, e.g. 0.97,0.95,0.92,0.9.")] = None,
    target_cuts: Annotated[Optional[str], typer.Option(help="Dynamic points at these MACs cuts (the r found as by "
                                                            "`fit-gates --target-cut`), comma-separated, e.g. 0.3,0.4.")] = None,
    fit_epochs: Annotated[Optional[int], typer.Option(min=1, help="fit-gates epochs per dynamic point.", show_default="the recipe's, else 2")] = None,
    finetune_epochs: Annotated[Optional[int], typer.Option(min=0, help="finetune epochs per point (0: none); the static twins "
                                                                       "and the dense control get the same budget.",
                                                           show_default="the recipe's, else 1")] = None,
    static: Annotated[Optional[StaticImportance], typer.Option(help="Also a static twin per dynamic point: Torch-Pruning "
                                                                    "with this filter importance, pruned to the point's mean MACs.")] = None,
    static_global: Annotated[bool, typer.Option(help="Static twins rank channels across layers (Torch-Pruning global_pruning) "
                                                     "instead of one ratio per layer.")] = False,
    static_isomorphic: Annotated[bool, typer.Option(help="With --static-global: rank only among groups of the same "
                                                         "structure (Torch-Pruning isomorphic pruning).")] = False,
    static_round_to: Annotated[Optional[int], typer.Option(help="Static twins keep channel counts in multiples of this "
                                                                "(8, 16: the kernels' blocks).")] = None,
    hybrid: Annotated[Optional[float], typer.Option(
        help="Also a hybrid per dynamic point (`ftwt hybrid --epsilon` of its fitted gates, fine-tuned with the same "
             "budget), with a static twin of its own.")] = None,
    task_aware: Annotated[bool, typer.Option(help="Dynamic and hybrid points fine-tune with task-aware gates (`finetune "
                                                  "--task-aware`); a dynamic point of --target-cuts holds its cut with the "
                                                  "budget term.")] = False,
    dense_control: Annotated[bool, typer.Option(help="Also the source fine-tuned with the same budget, every gate open.")] = False,
    bench: Annotated[bool, typer.Option(help="Also each point's median latency at batch 1 on this machine (as `ftwt bench`).")] = False,
    recipe: Recipe = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for shuffling and augmentation (every point).")] = None,
    workers: Workers = None,
    calib_samples: Annotated[Optional[int], typer.Option(min=1, help="Training images --target-cuts are measured on.",
                                                         show_default="2048")] = None,
    val_split: ValSplit = None,
    train_samples: TrainSamples = None,
    device: Device = "auto",
    amp: Amp = "auto",
    out: Annotated[Path, typer.Option(help="Sweep folder: one run per point, sweep.json, sweep.md, pareto.png.")] = Path("ftwt-sweep"),
    arch: Arch = None,
    num_classes: NumClasses = None,
    in_chans: InChans = None,
    input_size: InputSize = None,
    mean: Mean = None,
    std: Std = None,
    interpolation: InterpolationOpt = None,
    crop_pct: CropPct = None,
    augment: AugmentOpt = None,
    trust_pickle: TrustPickle = False,
    use_ema: UseEma = False,
    include: Include = None,
    exclude: Exclude = None,
    gate_shortcuts: GateShortcuts = False,
    depthwise_follow: DepthwiseFollow = False,
    residual_stream: ResidualStream = False,
    group_size: GroupSize = 1,
    no_source_check: NoSourceCheck = False,
) -> None:
    """Accuracy against MACs over several r: dynamic points (and hybrids), static twins at equal MACs and a dense control.
    Re-running the same command skips finished points and resumes an interrupted one."""
    # the values are checked by run_sweep, before any slow work
    r_list = float_list(rs, "--rs", "0.95,0.9") or []
    cut_list = float_list(target_cuts, "--target-cuts", "0.3,0.4") or []
    from ..static.prune import StaticOptions
    from ..sweep import run_sweep
    from ..train.config import (
        FinetuneConfig,
        FitGatesConfig,
        load_recipe,
        resolve_config,
    )
    rec = load_recipe(recipe) if recipe else None
    fit = resolve_config(FitGatesConfig, rec, "fit_gates", dict(epochs=fit_epochs, seed=seed, workers=workers, calib_samples=calib_samples))
    # 0 (no finetune) is not a valid FinetuneConfig epoch count, so it is set after validation
    ft = resolve_config(FinetuneConfig, rec, "finetune", dict(epochs=finetune_epochs or None, seed=seed, workers=workers,
                                                             task_aware=task_aware or None))
    if finetune_epochs == 0:
        ft.epochs = 0
    opts = attach_options(arch=arch, num_classes=num_classes, in_chans=in_chans, input_size=input_size, mean=mean, std=std,
                          interpolation=interpolation, crop_pct=crop_pct, augment=augment, trust_pickle=trust_pickle,
                          use_ema=use_ema, include=include, exclude=exclude, gate_shortcuts=gate_shortcuts,
                          depthwise_follow=depthwise_follow, group_size=group_size, residual_stream=residual_stream)
    from ..runtime.dist import launched_rank
    main = launched_rank() == 0                     # under torchrun, rank 0 alone prints
    say = (lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True)) if main else None
    points = run_sweep(checkpoint, data_arg(data, rec), out, rs=r_list, target_cuts=cut_list, static=value(static),
                       dense_control=dense_control, attach_options=opts, fit_cfg=fit, finetune_cfg=ft, val_split=val_split,
                       train_samples=train_samples, device=device, amp=value(amp), on_event=say,
                       progress=EpochProgress() if main else None, bench=bench, check_source=not no_source_check,
                       static_options=StaticOptions(static_global, static_isomorphic, static_round_to), hybrid=hybrid)
    if not main:
        return
    from rich.table import Table

    from ..eval.report import fmt_macs
    t = Table(title=f"sweep in {out}")
    for c in ("point", "r", "MACs", "cut", "top-1") + (("ms, batch 1",) if bench else ()):
        t.add_column(c, justify="left" if c == "point" else "right")
    for p in points:
        t.add_row(p.name, "–" if p.r is None else f"{p.r:g}", "–" if p.macs_mean is None else fmt_macs(p.macs_mean),
                  "–" if p.cut is None else f"{p.cut:.1%}", "–" if p.top1 is None else f"{p.top1:.2%}",
                  *((("–" if p.latency_ms is None else f"{p.latency_ms:.2f}"),) if bench else ()))
    console.print(t)
    from ..sweep.report import verdict_of
    by = {p.name: p for p in points}
    for p in points:
        twin = by.get(p.twin) if p.kind == "static" else None
        if twin is not None and twin.top1 is not None and p.top1 is not None:
            console.print(f"{twin.name}: {verdict_of(twin, p)}.", markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote sweep.json, sweep.md and pareto.png into {out}", markup=False, highlight=False, soft_wrap=True)
