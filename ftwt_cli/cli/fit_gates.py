"""``ftwt fit-gates``: train the gates on the frozen backbone (thin wrapper over :func:`ftwt_cli.train.fit_gates`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ..train import FitGatesConfig, fit_gates, load_recipe, resolve_config
from .application import command, console
from .options import (
    BatchSize,
    Data,
    GtRule,
    Recipe,
    Resume,
    Run,
    Seed,
    TrainSamples,
    ValSplit,
    Workers,
    value,
)
from .progress import EpochProgress

__all__ = ["fit_gates_cli"]


@command("fit-gates")
def fit_gates_cli(
    data: Data,
    r: Annotated[Optional[float], typer.Option(help="Heatmap-mass threshold in (0, 1]; 1 drops only dead channels.")] = None,
    gt: Annotated[Optional[GtRule], typer.Option(help="Ground-truth rule (uniform keeps a fraction r per layer).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate of the gates.")] = None,
    batch_size: BatchSize = None,
    workers: Workers = None,
    seed: Seed = None,
    val_split: ValSplit = None,
    train_samples: TrainSamples = None,
    recipe: Recipe = None,
    resume: Resume = False,
    run: Run = Path("ftwt-run"),
) -> None:
    """Train the decision gates on the frozen backbone (BCE against self-supervised heatmap-mass masks)."""
    cfg = resolve_config(FitGatesConfig, load_recipe(recipe) if recipe else None, "fit_gates",
                         dict(r=r, gt=value(gt), epochs=epochs, lr=lr, batch_size=batch_size, workers=workers, seed=seed), partial=resume)
    rep = fit_gates(run, data, cfg, resume=resume, val_split=val_split, train_samples=train_samples, progress=EpochProgress())
    f = rep.final
    console.print(f"gates fitted at r={rep.config['r']}: val top-1 {f.top1:.2%}, MACs {f.mean_macs / 1e6:.2f} M of "
                  f"{f.dense_macs / 1e6:.2f} M dense ({f.reduction:.1%} cut, gates included); run {rep.run_dir}",
                  markup=False, highlight=False, soft_wrap=True)
