"""``ftwt finetune``: train the backbone under hard masks while the gates keep learning."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ..train import FinetuneConfig, finetune, load_recipe, resolve_config
from .application import command, console
from .options import (
    BatchSize,
    Data,
    FinetuneMode,
    Recipe,
    Resume,
    Run,
    Schedule,
    Seed,
    TrainSamples,
    ValSplit,
    Workers,
    value,
)
from .progress import EpochProgress

__all__ = ["finetune_cli"]


@command("finetune")
def finetune_cli(
    data: Data,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Backbone SGD learning rate.")] = None,
    gate_lr: Annotated[Optional[float], typer.Option(help="Gate Adam learning rate.")] = None,
    mode: Annotated[Optional[FinetuneMode], typer.Option(help="decoupled: gates see a detached input; joint: BCE also trains the backbone.")] = None,
    schedule: Annotated[Optional[Schedule], typer.Option(help="Learning-rate schedule, per iteration.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Backbone weight decay.")] = None,
    batch_size: BatchSize = None,
    workers: Workers = None,
    seed: Seed = None,
    r: Annotated[Optional[float], typer.Option(help="Ground-truth r (default: the r the gates were fitted with).")] = None,
    val_split: ValSplit = None,
    train_samples: TrainSamples = None,
    bce_weight: Annotated[Optional[float], typer.Option(help="Weight of the gate loss (BCE summed over filters); in joint mode it also scales what reaches the backbone.")] = None,
    freeze_gates_at: Annotated[Optional[float], typer.Option(help="Fraction of the iterations the gates learn for; then they freeze (FTWT: 0.5; default 1).")] = None,
    distill: Annotated[Optional[float], typer.Option(help="Weight α in [0, 1] of distillation from the starting model (0 = off).")] = None,
    distill_temp: Annotated[Optional[float], typer.Option(help="Distillation temperature T.")] = None,
    dense_control: Annotated[bool, typer.Option(help="Train with every gate open and no gate loss: a dense control for a fair comparison.")] = False,
    recipe: Recipe = None,
    resume: Resume = False,
    run: Run = Path("ftwt-run"),
) -> None:
    """Fine-tune the backbone with hard masks (cross-entropy) while the gates keep training (BCE)."""
    cfg = resolve_config(FinetuneConfig, load_recipe(recipe) if recipe else None, "finetune",
                         dict(epochs=epochs, lr=lr, gate_lr=gate_lr, mode=value(mode), schedule=value(schedule), weight_decay=weight_decay,
                              batch_size=batch_size, workers=workers, seed=seed, r=r,
                              bce_weight=bce_weight, freeze_gates_at=freeze_gates_at, distill=distill, distill_temp=distill_temp), partial=resume)
    rep = finetune(run, data, cfg, resume=resume, val_split=val_split, train_samples=train_samples, dense_control=dense_control, progress=EpochProgress())
    f = rep.final
    console.print(f"fine-tuned ({'dense control' if dense_control else cfg.mode}): val top-1 {f.top1:.2%}, MACs "
                  f"{f.mean_macs / 1e6:.2f} M of {f.dense_macs / 1e6:.2f} M dense ({f.reduction:.1%} cut); run {rep.run_dir}",
                  markup=False, highlight=False, soft_wrap=True)
