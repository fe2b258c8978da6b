"""``ftwt finetune``: train the backbone under hard masks while the gates keep learning."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ..train.config import FinetuneConfig, load_recipe, resolve_config
from .application import command, console
from .options import (
    Amp,
    ChannelsLast,
    DataOrRecipe,
    Device,
    FinetuneMode,
    NoSourceCheck,
    Recipe,
    Resume,
    Run,
    Schedule,
    TrainSamples,
    ValSplit,
    Workers,
    config_option,
    data_arg,
    default_of,
    int_list,
    value,
)
from .progress import EpochProgress

__all__ = ["finetune_cli"]


def _opt(help: str, name: str):
    return config_option(FinetuneConfig, name, help)


@command("finetune")
def finetune_cli(
    data: DataOrRecipe = None,
    epochs: Annotated[Optional[int], _opt("Epochs.", "epochs")] = None,
    lr: Annotated[Optional[float], _opt("Backbone SGD learning rate.", "lr")] = None,
    gate_lr: Annotated[Optional[float], _opt("Gate Adam learning rate.", "gate_lr")] = None,
    momentum: Annotated[Optional[float], _opt("Backbone SGD momentum.", "momentum")] = None,
    mode: Annotated[Optional[FinetuneMode], _opt("decoupled: gates see a detached input; joint: BCE also trains the "
                                                 "backbone.", "mode")] = None,
    schedule: Annotated[Optional[Schedule], _opt("Learning-rate schedule, per iteration.", "schedule")] = None,
    step_epochs: Annotated[Optional[str], typer.Option(help="With --schedule step: epochs at which the learning rate is "
                                                           "multiplied by --gamma, comma-separated, e.g. 30,60.",
                                                       show_default="none")] = None,
    gamma: Annotated[Optional[float], _opt("With --schedule step: the factor at each step epoch.", "gamma")] = None,
    weight_decay: Annotated[Optional[float], _opt("Backbone weight decay.", "weight_decay")] = None,
    label_smoothing: Annotated[Optional[float], _opt("Label smoothing of the cross-entropy.", "label_smoothing")] = None,
    batch_size: Annotated[Optional[int], _opt("Batch size per process.", "batch_size")] = None,
    workers: Workers = None,
    seed: Annotated[Optional[int], _opt("Seed for shuffling and augmentation.", "seed")] = None,
    r: Annotated[Optional[float], _opt("Ground-truth r.", "r")] = None,
    val_split: ValSplit = None,
    train_samples: TrainSamples = None,
    bce_weight: Annotated[Optional[float], typer.Option(
        help="Weight of the gate loss (BCE summed over filters); in joint mode it also scales what reaches the backbone.",
        show_default="1; 0 with --task-aware --target-cut")] = None,
    freeze_gates_at: Annotated[Optional[float], _opt("Fraction of the iterations the gates learn for; then they freeze "
                                                     "(FTWT: 0.5).", "freeze_gates_at")] = None,
    distill: Annotated[Optional[float], _opt("Weight α in [0, 1] of distillation from the starting model (0 = off).",
                                             "distill")] = None,
    distill_temp: Annotated[Optional[float], _opt("Distillation temperature T.", "distill_temp")] = None,
    task_aware: Annotated[Optional[bool], typer.Option(
        "--task-aware/--no-task-aware", help="Straight-through masks: the task loss reaches the gates too (hard masks "
        "forward, the sigmoid's gradient backward); with --target-cut the BCE is off unless --bce-weight is given.",
        show_default=default_of(FinetuneConfig, "task_aware"))] = None,
    target_cut: Annotated[Optional[float], _opt("With --task-aware: the share of exact MACs (gates included) to cut, "
                                                "held by a budget term through the straight-through masks.",
                                                "target_cut")] = None,
    budget_weight: Annotated[Optional[float], _opt("Weight λ of the budget term λ·(MACs/dense − (1 − target cut))² "
                                                   "(DGNet's default).", "budget_weight")] = None,
    dense_control: Annotated[bool, typer.Option(help="Train with every gate open and no gate loss: a dense control for a fair comparison.")] = False,
    recipe: Recipe = None,
    resume: Resume = False,
    tensorboard: Annotated[bool, typer.Option(help="Also log each epoch's metrics to TensorBoard in RUN/tensorboard.")] = False,
    sync_bn: Annotated[bool, typer.Option(help="Under torchrun on GPUs: BatchNorm statistics over all processes' batches.")] = False,
    device: Device = "auto",
    amp: Amp = "auto",
    channels_last: ChannelsLast = None,
    no_source_check: NoSourceCheck = False,
    run: Run = Path("ftwt-run"),
) -> None:
    """Fine-tune the backbone with hard masks (cross-entropy) while the gates keep training (BCE)."""
    from ..train.loops import finetune
    rec = load_recipe(recipe) if recipe else None
    cfg = resolve_config(FinetuneConfig, rec, "finetune",
                         dict(epochs=epochs, lr=lr, gate_lr=gate_lr, momentum=momentum, mode=value(mode), schedule=value(schedule),
                              step_epochs=int_list(step_epochs, "--step-epochs"), gamma=gamma, weight_decay=weight_decay,
                              label_smoothing=label_smoothing, batch_size=batch_size, workers=workers, seed=seed, r=r,
                              bce_weight=bce_weight, freeze_gates_at=freeze_gates_at, distill=distill, distill_temp=distill_temp,
                              task_aware=task_aware, target_cut=target_cut, budget_weight=budget_weight),
                         partial=resume)
    rep = finetune(run, data_arg(data, rec, run), cfg, resume=resume, val_split=val_split, train_samples=train_samples,
                   dense_control=dense_control, progress=EpochProgress(), tensorboard=tensorboard,
                   device=device, amp=value(amp), channels_last=channels_last, sync_bn=sync_bn,
                   check_source=not no_source_check)
    f = rep.final
    if not rep.main:                   # under torchrun, rank 0 alone reports
        return
    how = "dense control" if dense_control else rep.config["mode"] + (", task-aware" if rep.config.get("task_aware") else "")
    console.print(f"fine-tuned ({how}): val top-1 {f.top1:.2%}, MACs "
                  f"{f.mean_macs / 1e6:.2f} M of {f.dense_macs / 1e6:.2f} M dense ({f.reduction:.1%} cut); run {rep.run_dir}",
                  markup=False, highlight=False, soft_wrap=True)
