"""``ftwt finetune``: train the backbone under hard masks while the gates keep learning."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ..config import FinetuneConfig, load_recipe, resolve_config
from ..train import finetune
from ._app import command, console
from ._progress import EpochProgress
from .fit_gates import DATA_HELP

__all__ = ["finetune_cli"]


@command("finetune")
def finetune_cli(
    data: Annotated[str, typer.Option(help=DATA_HELP)],
    epochs: Annotated[Optional[int], typer.Option(help="Epochs.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Backbone SGD learning rate.")] = None,
    gate_lr: Annotated[Optional[float], typer.Option(help="Gate Adam learning rate.")] = None,
    mode: Annotated[Optional[str], typer.Option(help="decoupled (gates see a detached input) | joint (BCE also trains the backbone).")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="cosine | step | constant.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Backbone weight decay.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=0, help="DataLoader worker processes (default: 0 on a 2-core CPU, else half the cores, at most 4).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for shuffling and augmentation.")] = None,
    r: Annotated[Optional[float], typer.Option(help="Ground-truth r (default: the r the gates were fitted with).")] = None,
    val_split: Annotated[Optional[float], typer.Option(help="Hold out this fraction of DIR/CLASS images for validation.")] = None,
    train_samples: Annotated[Optional[int], typer.Option(help="Train on a fixed random subset of this many images.")] = None,
    bce_weight: Annotated[Optional[float], typer.Option(help="Weight of the gate loss (BCE summed over filters); in joint mode it also scales what reaches the backbone.")] = None,
    freeze_gates_at: Annotated[Optional[float], typer.Option(help="Fraction of the iterations the gates learn for; then they freeze (FTWT: 0.5; default 1).")] = None,
    distill: Annotated[Optional[float], typer.Option(help="Weight α in [0, 1] of distillation from the starting model (0 = off).")] = None,
    distill_temp: Annotated[Optional[float], typer.Option(help="Distillation temperature T.")] = None,
    dense_control: Annotated[bool, typer.Option(help="Train with every gate open and no gate loss: a dense control for a fair comparison.")] = False,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML recipe; flags override it.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted finetune from its last epoch.")] = False,
    run: Annotated[Path, typer.Option(help="Run directory.")] = Path("ftwt-run"),
) -> None:
    """Fine-tune the backbone with hard masks (cross-entropy) while the gates keep training (BCE)."""
    cfg = resolve_config(FinetuneConfig, load_recipe(recipe) if recipe else None, "finetune",
                         dict(epochs=epochs, lr=lr, gate_lr=gate_lr, mode=mode, schedule=schedule, weight_decay=weight_decay,
                              batch_size=batch_size, workers=workers, seed=seed, r=r,
                              bce_weight=bce_weight, freeze_gates_at=freeze_gates_at, distill=distill, distill_temp=distill_temp))
    rep = finetune(run, data, cfg, resume=resume, val_split=val_split, train_samples=train_samples, dense_control=dense_control, progress=EpochProgress())
    f = rep.final
    console.print(f"fine-tuned ({'dense control' if dense_control else cfg.mode}): val top-1 {f.top1:.2%}, MACs "
                  f"{f.mean_macs / 1e6:.2f} M of {f.dense_macs / 1e6:.2f} M dense ({f.reduction:.1%} cut); run {rep.run_dir}",
                  markup=False, highlight=False, soft_wrap=True)
