"""BatchNorm statistics re-estimated under the gates' masks (after fit-gates), or under one fixed mask (the frozen
majority control of ``eval.frozen``, which must not be judged with statistics of the masks it replaces).

fit-gates freezes the backbone, so every BatchNorm keeps the running mean and variance of the dense model, while the
masks change what each layer reads: a masked conv2 thins the sum a block adds, a masked expansion thins the depthwise
conv's input. Re-estimating them on training images with the predicted masks applied (as pruned networks recalibrate
BN, and as ``torch.optim.swa_utils.update_bn`` does for averaged weights) removes that shift without training a
weight: BN runs in training mode with ``momentum=None`` (a cumulative average over the batches), no gradient, and is
put back in eval mode with its own momentum afterwards. Under torchrun every process's statistics are averaged.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterable, Iterator, Mapping, Optional

import torch
import torch.nn as nn

from ..gating.model import GatedModel
from ..runtime.device import Precision
from ..runtime.dist import Dist, average_buffers

__all__ = ["recalibrate_bn", "kept_statistics"]


@torch.no_grad()
def recalibrate_bn(model: GatedModel, batches: Iterable, precision: Precision, dist: Dist = Dist(), *,
                   forced: Optional[Mapping[str, torch.Tensor]] = None) -> int:
    """Reset and re-estimate the running statistics of every BatchNorm of ``model``'s backbone on ``batches`` (images,
    or (images, labels)) under the model's current gate mode, or under ``forced`` ((C_out,) bool mask per gated layer,
    the same for every image); returns the number of images used."""
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                  # cumulative moving average: every batch weighs the same
    model.eval()
    for m in norms:
        m.train()
    seen = 0
    try:
        for b in batches:
            x = b[0] if isinstance(b, (list, tuple)) else b
            x = precision.batch(x)
            force = {k: v.to(x.device).expand(len(x), -1) for k, v in forced.items()} if forced is not None else None
            with precision.autocast(), (model.forcing(force) if force is not None else nullcontext()):
                model(x)
            seen += int(x.shape[0])
    finally:
        for m, mom in zip(norms, momenta):
            m.momentum = mom
        model.train(was_training)
        for m in norms:
            m.train(was_training)
    average_buffers(model, dist)
    return seen


@contextmanager
def kept_statistics(model: nn.Module) -> Iterator[None]:
    """Put every buffer of ``model`` (BatchNorm's running statistics and batch counts) back as it was on leaving."""
    saved = {k: v.clone() for k, v in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(saved[k])
