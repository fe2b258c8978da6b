"""A run's (or an exported file's) latency: the model loaded, one batch of its data's validation images (or random
inputs), and ``fast.timing.bench`` on it. ``ftwt bench`` and the sweep's latency column both call ``bench_run``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch

from ..arch.dataconfig import DataConfig
from ..data import DataChoice, make_loader, open_data
from ..errors import FtwtError
from ..fast.timing import BenchReport, bench, oracle_masks
from .loader import load

__all__ = ["bench_run"]


def bench_run(source: Path | str, *, batch_size: int = 1, input_size: Optional[Tuple[int, int, int]] = None,
              data: Optional[str] = None, choice: DataChoice = DataChoice(), r: Optional[float] = None,
              warmup: int = 10, reps: int = 50, threads: Optional[int] = None, check_gates: bool = True) -> BenchReport:
    """Latency of ``source`` (a run directory or exported file) on ``batch_size`` validation images of ``data`` at
    ``input_size`` (default: the run's), or on random inputs when ``data`` is None. ``r`` replays oracle masks at that
    r instead of the gates' decisions (a model whose gates are not fitted needs it, unless ``check_gates`` is
    False: then only its dense rows mean anything, as for a sweep's dense point)."""
    if batch_size < 1 or reps < 1:
        raise FtwtError("--batch-size and --reps must be at least 1", "e.g. --batch-size 1 --reps 50")
    model = load(source)
    dc = model.meta.data_config
    size = tuple(input_size or dc.input_size)
    if check_gates and model.units and model.meta.gating.mode != "predict" and r is None:
        raise FtwtError("the gates are not fitted yet", "run `ftwt fit-gates` first, or pass --r to replay oracle masks")
    if data is not None:
        cfg = DataConfig(size, dc.mean, dc.std, dc.interpolation, dc.crop_pct, dc.crop_mode)
        x, _ = next(iter(make_loader(open_data(data, cfg, choice=choice).val, batch_size, train=False, workers=0)))
    else:
        x = torch.randn(batch_size, *size)
    masks = oracle_masks(model, x, r) if r is not None else None
    return bench(model, x, masks=masks, warmup=warmup, reps=reps, threads=threads)
