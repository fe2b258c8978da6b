"""``ftwt bench``: latency of dense, gated-masked and gated-compact execution (wraps :func:`ftwt_cli.runs.bench.bench_run`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from typing_extensions import Annotated

from .application import command, console
from .options import DATA_HELP, Run

__all__ = ["bench_cli"]


@command("bench")
def bench_cli(
    run: Run = Path("ftwt-run"),
    file: Annotated[Optional[Path], typer.Option(help="An exported .safetensors file (instead of --run).")] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size (1 is the target case).")] = 1,
    input_size: Annotated[Optional[str], typer.Option(help="C,H,W (default: the run's).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch intra-op threads (default: torch's).")] = None,
    data: Annotated[Optional[str], typer.Option(help="Benchmark on real images from this data's validation split. " + DATA_HELP)] = None,
    r: Annotated[Optional[float], typer.Option(help="Replay oracle masks at this r instead of the gates' decisions.")] = None,
    reps: Annotated[int, typer.Option(help="Timed repetitions per variant.")] = 50,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs per variant.")] = 10,
    json_out: Annotated[bool, typer.Option("--json", help="Print the measurements as JSON.")] = False,
    onnx: Annotated[Optional[Path], typer.Option(help="Also time this ONNX file (`ftwt export --format onnx`) in onnxruntime.")] = None,
) -> None:
    """Latency (p50/p90) of dense, gated-masked and gated-compact execution, with the MACs ratio beside it."""
    from ..attach import parse_input_size
    from ..runs.bench import bench_run
    if data is None and not json_out:
        console.print("note: random inputs; gates decide differently on real images (pass --data)", markup=False)
    rep = bench_run(file if file is not None else run, batch_size=batch_size, input_size=parse_input_size(input_size),
                    data=data, r=r, warmup=warmup, reps=reps, threads=threads, onnx=onnx)
    size = rep.input_size
    if json_out:
        import dataclasses
        import json
        compact = any(row.variant == "compact" for row in rep.rows)
        console.print_json(json.dumps({**dataclasses.asdict(rep), "latency_ratio": rep.latency_ratio if compact else None,
                                       "macs_ratio": rep.macs_ratio if compact else None}))
        return
    t = Table(title=f"{rep.arch}, batch {rep.batch_size}, {size[1]}×{size[2]}, {rep.threads} threads, mean keep {rep.keep:.1%}")
    for c in ("variant", "p50 ms", "p90 ms", "MACs", "latency ratio", "MACs ratio"):
        t.add_column(c, justify="left" if c == "variant" else "right")
    d = rep.row("dense")
    for row in rep.rows:
        t.add_row(row.variant, f"{row.p50_ms:.2f}", f"{row.p90_ms:.2f}", f"{row.macs / 1e6:.1f} M",
                  f"{row.p50_ms / d.p50_ms:.2f}", f"{row.macs / d.macs:.2f}")
    console.print(t)
    compact = any(row.variant == "compact" for row in rep.rows)
    src = next((row for row in rep.rows if row.variant == "source-dense-folded"), None)
    if src is not None:                # a static twin or a hybrid, against the model it replaces
        best = rep.row("compact" if compact else "dense-folded")
        console.print(f"{best.variant} against the unpruned source architecture (BN folded, same input): latency ratio "
                      f"{best.p50_ms / src.p50_ms:.2f} for a MACs ratio of {best.macs / src.macs:.2f}",
                      markup=False, highlight=False, soft_wrap=True)
    if not compact:                    # a static twin: a plain dense network
        return
    console.print(f"compact vs dense with the same BN folding: latency ratio {rep.latency_ratio:.2f} for a MACs ratio of "
                  f"{rep.macs_ratio:.2f} ({rep.latency_ratio / rep.macs_ratio:.2f}× the ideal; strategies {rep.strategies}; {rep.chains} chained pairs)",
                  markup=False, highlight=False, soft_wrap=True)
