"""BatchNorm statistics re-estimated under the gates' masks (after fit-gates).

fit-gates freezes the backbone, so every BatchNorm keeps the running mean and variance of the dense model, while the
masks change what each layer reads: a masked conv2 thins the sum a block adds, a masked expansion thins the depthwise
conv's input. Re-estimating them on training images with the predicted masks applied (as pruned networks recalibrate
BN, and as ``torch.optim.swa_utils.update_bn`` does for averaged weights) removes that shift without training a
weight: BN runs in training mode with ``momentum=None`` (a cumulative average over the batches), no gradient, and is
put back in eval mode with its own momentum afterwards. Under torchrun every process's statistics are averaged.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from ..gating.model import GatedModel
from ..runtime.device import Precision
from ..runtime.dist import Dist, average_buffers

__all__ = ["recalibrate_bn"]


@torch.no_grad()
def recalibrate_bn(model: GatedModel, batches: Iterable, precision: Precision, dist: Dist = Dist()) -> int:
    """Reset and re-estimate the running statistics of every BatchNorm of ``model``'s backbone on ``batches`` (images,
    or (images, labels)) under the model's current gate mode; returns the number of images used."""
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
            with precision.autocast():
                model(precision.batch(x))
            seen += int(x.shape[0])
    finally:
        for m, mom in zip(norms, momenta):
            m.momentum = mom
        model.train(was_training)
        for m in norms:
            m.train(was_training)
    average_buffers(model, dist)
    return seen
