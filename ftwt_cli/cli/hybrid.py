"""``ftwt hybrid``: static where the gates' decisions do not vary, dynamic where they do (thin wrapper over
:func:`ftwt_cli.runs.hybrid.make_hybrid_run`)."""
from __future__ import annotations

from pathlib import Path

import typer
from typing_extensions import Annotated

from .application import command, console
from .options import DataOrRecipe, Run, Workers, data_arg

__all__ = ["hybrid_cli"]


@command("hybrid")
def hybrid_cli(
    out: Annotated[Path, typer.Option(help="The new run directory the hybrid model is written to.")],
    data: DataOrRecipe = None,
    epsilon: Annotated[float, typer.Option(
        help="In (0, 0.5): channels firing on fewer than this share of the training images are removed; those firing "
             "on more than 1 − epsilon run always, without a gate.")] = 0.05,
    images: Annotated[int, typer.Option(help="Training images (eval transform) the firing rates are measured on.")] = 2048,
    batch_size: Annotated[int, typer.Option(help="Batch size of that measurement.")] = 128,
    workers: Workers = None,
    force: Annotated[bool, typer.Option(help="Replace --out if it is an ftwt run.")] = False,
    run: Run = Path("ftwt-run"),
) -> None:
    """Make a hybrid of a run with fitted gates: channels that (nearly) never fire removed, those that (nearly) always
    fire ungated, gates only where decisions vary. Fine-tune it with `ftwt finetune --run OUT`."""
    from ..runs.hybrid import check_epsilon, make_hybrid_run
    check_epsilon(epsilon)
    rep = make_hybrid_run(run, data_arg(data, None, run), out, epsilon=epsilon, images=images, batch_size=batch_size,
                          workers=workers, force=force)
    console.print(f"hybrid of {run} at epsilon {rep.epsilon} (firing rates on {rep.images} training images): of "
                  f"{rep.channels} gated channels {rep.removed} removed, {rep.fixed} always run, {rep.varying} keep a gate"
                  + (f" ({rep.coupled} rarely firing but coupled to other layers, e.g. a residual add)" if rep.coupled else "")
                  + f"; {rep.units_gated} of {rep.units} units keep gates; {rep.dense_macs / 1e6:.2f} M MACs with every "
                  f"gate open ({1 - rep.dense_macs / rep.source_macs:.1%} below the source); run {rep.run_dir}. "
                  f"Next: ftwt finetune --run {rep.run_dir}", markup=False, highlight=False, soft_wrap=True)
