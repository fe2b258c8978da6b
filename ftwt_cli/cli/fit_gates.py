"""``ftwt fit-gates``: train the gates on the frozen backbone (thin wrapper over :func:`ftwt_cli.train.fit_gates`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ..config import FitGatesConfig, load_recipe, resolve_config
from ..train import fit_gates
from ._app import command, console
from ._progress import EpochProgress

__all__ = ["fit_gates_cli"]

DATA_HELP = "ImageFolder DIR, a CIFAR-10/100 folder, 'fashion-mnist' (or its idx folder), or 'digits'."


@command("fit-gates")
def fit_gates_cli(
    data: Annotated[str, typer.Option(help=DATA_HELP)],
    r: Annotated[Optional[float], typer.Option(help="Heatmap-mass threshold in (0, 1]; 1 drops only dead channels.")] = None,
    gt: Annotated[Optional[str], typer.Option(help="Ground-truth rule: mass | uniform (keeps a fraction r per layer).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate of the gates.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=0, help="DataLoader worker processes (default: 0 on a 2-core CPU, else half the cores, at most 4).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for shuffling and augmentation.")] = None,
    val_split: Annotated[Optional[float], typer.Option(help="Hold out this fraction of DIR/CLASS images for validation.")] = None,
    train_samples: Annotated[Optional[int], typer.Option(help="Train on a fixed random subset of this many images.")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML recipe; flags override it.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted fit-gates from its last epoch.")] = False,
    run: Annotated[Path, typer.Option(help="Run directory.")] = Path("ftwt-run"),
) -> None:
    """Train the decision gates on the frozen backbone (BCE against self-supervised heatmap-mass masks)."""
    cfg = resolve_config(FitGatesConfig, load_recipe(recipe) if recipe else None, "fit_gates",
                         dict(r=r, gt=gt, epochs=epochs, lr=lr, batch_size=batch_size, workers=workers, seed=seed))
    rep = fit_gates(run, data, cfg, resume=resume, val_split=val_split, train_samples=train_samples, progress=EpochProgress())
    f = rep.final
    console.print(f"gates fitted at r={rep.config['r']}: val top-1 {f.top1:.2%}, MACs {f.mean_macs / 1e6:.2f} M of "
                  f"{f.dense_macs / 1e6:.2f} M dense ({f.reduction:.1%} cut, gates included); run {rep.run_dir}",
                  markup=False, highlight=False, soft_wrap=True)
