"""``ftwt fit-gates``: train the gates on the frozen backbone (thin wrapper over :func:`ftwt_cli.train.fit_gates`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ..train.config import FitGatesConfig, load_recipe, resolve_config
from .application import command, console
from .options import (
    Amp,
    ChannelsLast,
    DataOrRecipe,
    Device,
    GroupOrder,
    GtRule,
    NoSourceCheck,
    Recipe,
    Resume,
    Run,
    TrainSamples,
    ValSplit,
    Workers,
    config_option,
    data_arg,
    value,
)
from .progress import EpochProgress

__all__ = ["fit_gates_cli"]


def _opt(help: str, name: str):
    return config_option(FitGatesConfig, name, help)


@command("fit-gates")
def fit_gates_cli(
    data: DataOrRecipe = None,
    r: Annotated[Optional[float], _opt("Heatmap-mass threshold in (0, 1]; 1 drops only dead channels.", "r")] = None,
    target_cut: Annotated[Optional[float], typer.Option(
        help="Instead of --r: the share of MACs to cut (e.g. 0.4); fit-gates first finds the r whose oracle masks cut it "
             "on --calib-samples training images, then fits at that r.")] = None,
    calib_samples: Annotated[Optional[int], _opt("Training images (eval transform) --target-cut is measured on.", "calib_samples")] = None,
    recalibrate_bn: Annotated[Optional[int], _opt(
        "Re-estimate BatchNorm statistics under the predicted masks at the end of every epoch, on this many training "
        "images (0: keep the dense model's).", "recalibrate_bn")] = None,
    group_order: Annotated[Optional[GroupOrder], _opt(
        "Gates of channel groups (attach --group-size): cofire orders channels into groups that fire together on "
        "--calib-samples training images before the first epoch; index keeps channel c in group c // G.",
        "group_order")] = None,
    gt: Annotated[Optional[GtRule], _opt("Ground-truth rule (uniform keeps a fraction r per layer).", "gt")] = None,
    epochs: Annotated[Optional[int], _opt("Epochs.", "epochs")] = None,
    lr: Annotated[Optional[float], _opt("Adam learning rate of the gates.", "lr")] = None,
    weight_decay: Annotated[Optional[float], _opt("Adam weight decay of the gates.", "weight_decay")] = None,
    batch_size: Annotated[Optional[int], _opt("Batch size per process.", "batch_size")] = None,
    workers: Workers = None,
    seed: Annotated[Optional[int], _opt("Seed for shuffling and augmentation.", "seed")] = None,
    val_split: ValSplit = None,
    train_samples: TrainSamples = None,
    recipe: Recipe = None,
    resume: Resume = False,
    tensorboard: Annotated[bool, typer.Option(help="Also log each epoch's metrics to TensorBoard in RUN/tensorboard.")] = False,
    device: Device = "auto",
    amp: Amp = "auto",
    channels_last: ChannelsLast = None,
    no_source_check: NoSourceCheck = False,
    run: Run = Path("ftwt-run"),
) -> None:
    """Train the decision gates on the frozen backbone (BCE against self-supervised heatmap-mass masks)."""
    from ..errors import FtwtError
    from ..settings import check_cut
    if r is not None and target_cut is not None:
        raise FtwtError("--r and --target-cut both given", "pass one: --r sets the rule, --target-cut finds the r that cuts that share")
    if target_cut is not None:
        check_cut(target_cut)
    from ..train.loops import fit_gates
    rec = load_recipe(recipe) if recipe else None
    cfg = resolve_config(FitGatesConfig, rec, "fit_gates",
                         dict(r=r, gt=value(gt), epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, workers=workers,
                              seed=seed, target_cut=target_cut, calib_samples=calib_samples, recalibrate_bn=recalibrate_bn,
                              group_order=value(group_order)),
                         partial=resume)
    rep = fit_gates(run, data_arg(data, rec, run), cfg, resume=resume, val_split=val_split, train_samples=train_samples, progress=EpochProgress(), tensorboard=tensorboard,
                   device=device, amp=value(amp), channels_last=channels_last, check_source=not no_source_check)
    f = rep.final
    if not rep.main:                   # under torchrun, rank 0 alone reports
        return
    console.print(f"gates fitted at r={rep.config['r']}: val top-1 {f.top1:.2%}, MACs {f.mean_macs / 1e6:.2f} M of "
                  f"{f.dense_macs / 1e6:.2f} M dense ({f.reduction:.1%} cut, gates included); run {rep.run_dir}",
                  markup=False, highlight=False, soft_wrap=True)
