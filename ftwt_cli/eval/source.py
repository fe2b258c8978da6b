"""The source checkpoint's own accuracy, measured once, on the first data a command sees.

Why: a plain state dict states nothing about its input, so a wrong guess of architecture, input size or mean/std
trains happily at chance level. Before any training the run's backbone is still the source checkpoint, so its
dense top-1 on the validation split is both the check (near chance: stop, naming the likely causes and the flags
that set them) and the baseline every later report states its change against.

The check reads a fixed random subset of ``CHECK_SAMPLES`` validation images first, so a wrong setup stops after
seconds, then the rest, so the recorded top-1 is on the whole split that reports use.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from torch.utils.data import Subset

from ..data import make_loader
from ..errors import FtwtError
from ..formats.meta import SourceEval
from ..gating.model import GatedModel
from ..runtime.dist import shard
from .evaluate import evaluate_loader

if TYPE_CHECKING:
    from ..data import DataSplits
    from ..formats.meta import RunMeta, SourceEval
    from ..runtime.device import Precision
    from ..runtime.dist import Dist

__all__ = ["CHECK_SAMPLES", "chance_threshold", "measure_source", "near_chance_error", "to_measure"]

CHECK_SAMPLES = 512


def chance_threshold(num_classes: int, samples: int) -> float:
    """Top-1 below which a model is "near chance": chance (1/K) plus the larger of 3 standard errors of a guessing
    classifier on ``samples`` images and min(chance, (1 − chance)/4). For 10 classes and 512 images: 20%; for 1000
    classes: 0.52%; for 2 classes: 62.5%."""
    p = 1.0 / max(num_classes, 1)
    return p + max(3 * math.sqrt(p * (1 - p) / max(samples, 1)), min(p, (1 - p) / 4))


def near_chance_error(meta: "RunMeta", splits: "DataSplits", top1: float, samples: int, threshold: float) -> FtwtError:
    """The one-line error for a source model at chance: what it scored, the settings in use, what likely causes it
    and the flags that set them."""
    dc, k = meta.data_config, meta.arch.num_classes
    causes = [f"the input config (now {dc.input_size[1]}×{dc.input_size[2]}, mean {tuple(round(v, 3) for v in dc.mean)}, "
              f"std {tuple(round(v, 3) for v in dc.std)})"]
    if splits.native_size is not None:
        causes[0] += f"; the images are {splits.native_size[0]}×{splits.native_size[1]}"
    arch = f"the architecture (now {meta.arch})"
    if meta.source.alternatives:
        arch += f"; the weights also fit {', '.join(meta.source.alternatives)}"
    causes.append(arch)
    h, w = splits.native_size if splits.native_size is not None else ("H", "W")
    fix = (f"re-attach with the settings the checkpoint was trained with, e.g. `ftwt attach {meta.source.path} --force "
           f"--input-size {dc.input_size[0]},{h},{w} --mean .. --std ..`"
           + (f" or `--arch {meta.source.alternatives[0]}`" if meta.source.alternatives else " or `--arch SOURCE:NAME`")
           + "; check that --data has the classes the model was trained on; pass --no-source-check if the model "
             "really is this weak")
    return FtwtError(f"the source checkpoint scores {top1:.1%} top-1 on {samples} validation images of {splits.source}, "
                     f"near chance ({1 / k:.1%} for {k} classes; below {threshold:.1%} counts as chance). Likely causes: "
                     + "; ".join(causes), fix)


def to_measure(meta: "RunMeta") -> bool:
    """Whether the first data a command sees would measure the source: nothing recorded yet, and the run's weights are
    still the source's (no training, not a static twin)."""
    return meta.source_eval is None and meta.static is None and not meta.training


def measure_source(model: GatedModel, meta: "RunMeta", splits: "DataSplits", *, batch_size: int,
                   workers: Optional[int], precision: "Precision", dist: "Dist", check: bool = True,
                   on_batch=None) -> Optional["SourceEval"]:
    """The source checkpoint's top-1/top-5 on ``splits.val`` with every gate open, or None where the run's weights are
    no longer the source's (trained, or a static twin) or it was measured already on this data (then the recorded
    one is returned). ``check``: raise ``near_chance_error`` when the first ``CHECK_SAMPLES`` images score near chance.
    Under torchrun each process evaluates its shard and every process gets the same result."""

    if meta.source_eval is not None:
        return meta.source_eval if meta.source_eval.data == splits.source else None
    if not to_measure(meta):
        return None
    n = len(splits.val)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    first, rest = order[:CHECK_SAMPLES], order[CHECK_SAMPLES:]
    mode, r = model.mode, model.r
    model.set_gates("open")
    try:
        def run(idx):
            ds = shard(Subset(splits.val, idx), dist)
            return evaluate_loader(model, make_loader(ds, batch_size, train=False, workers=workers,
                                                      pin_memory=precision.device.type == "cuda"),
                                   precision=precision, dist=dist, on_batch=on_batch)
        a = run(first)
        threshold = chance_threshold(meta.arch.num_classes, a.samples)
        if check and a.top1 < threshold:
            raise near_chance_error(meta, splits, a.top1, a.samples, threshold)
        b = run(rest) if rest else None
    finally:
        model.set_gates(mode, r=r)
    total = a.samples + (b.samples if b else 0)
    top1 = (a.top1 * a.samples + (b.top1 * b.samples if b else 0.0)) / max(total, 1)
    top5 = (a.top5 * a.samples + (b.top5 * b.samples if b else 0.0)) / max(total, 1)
    return SourceEval(top1, top5, total, splits.source)
