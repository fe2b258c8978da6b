"""ImageNet-C-style corruptions (Hendrycks & Dietterich, ICLR'19) at severities 1-5, for OOD evaluation.

Each corruption maps a float image in [0, 1] (C, H, W) to a corrupted one. Severity parameters follow
ImageNet-C for large images and CIFAR-10-C for small ones (≤ 64 px), from the authors' make_*_c.py scripts.
Gaussian noise, Gaussian blur and JPEG use torchvision.transforms.v2; shot and impulse noise, motion blur,
contrast, brightness (additive, on all channels rather than HSV value) and pixelate are written here.
Random draws use the torch RNG: DataLoader seeds it per worker from its generator, and ``eval.run`` seeds it per
(corruption, severity) when there are no workers, so runs repeat and the gated and open passes see the same images.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

from ..errors import FtwtError

__all__ = ["CORRUPTIONS", "SEVERITIES", "corruption", "DEFAULT_CORRUPTIONS"]

SEVERITIES = (1, 2, 3, 4, 5)

# name -> (ImageNet-C parameters, CIFAR-10-C parameters), one per severity
_PARAMS: Dict[str, Tuple[tuple, tuple]] = {
    "gaussian_noise": ((0.08, 0.12, 0.18, 0.26, 0.38), (0.04, 0.06, 0.08, 0.09, 0.10)),
    "shot_noise": ((60, 25, 12, 5, 3), (500, 250, 100, 75, 50)),
    "impulse_noise": ((0.03, 0.06, 0.09, 0.17, 0.27), (0.01, 0.02, 0.03, 0.05, 0.07)),
    "gaussian_blur": ((1, 2, 3, 4, 6), (0.4, 0.6, 0.7, 0.8, 1.0)),
    "motion_blur": (((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)), ((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3))),
    "contrast": ((0.4, 0.3, 0.2, 0.1, 0.05), (0.75, 0.5, 0.4, 0.3, 0.15)),
    "brightness": ((0.1, 0.2, 0.3, 0.4, 0.5), (0.05, 0.1, 0.15, 0.2, 0.3)),
    "jpeg": ((25, 18, 15, 10, 7), (80, 65, 58, 50, 40)),
    "pixelate": ((0.6, 0.5, 0.4, 0.3, 0.25), (0.95, 0.9, 0.85, 0.75, 0.65)),
}
CORRUPTIONS = tuple(_PARAMS)
DEFAULT_CORRUPTIONS = CORRUPTIONS


def _gaussian_noise(x, sigma):
    from torchvision.transforms.v2 import functional as TF  # deferred: torchvision loads only when this runs (start-up)
    return TF.gaussian_noise(x, mean=0.0, sigma=float(sigma), clip=True)


def _shot_noise(x, lam):
    return (torch.poisson(x * lam) / lam).clamp(0, 1)


def _impulse_noise(x, amount):
    # salt and pepper on individual pixel values, as skimage's random_noise(mode='s&p') does
    u = torch.rand_like(x)
    x = x.clone()
    x[u < amount / 2] = 0.0
    x[(u >= amount / 2) & (u < amount)] = 1.0
    return x


def _gaussian_blur(x, sigma):
    from torchvision.transforms.v2 import functional as TF  # deferred: torchvision loads only when this runs (start-up)
    k = 2 * math.ceil(3 * sigma) + 1
    k = min(k, 2 * (min(x.shape[-2:]) // 2) - 1 if min(x.shape[-2:]) > 2 else 1)
    return TF.gaussian_blur(x, kernel_size=[k, k], sigma=[float(sigma)] * 2) if k > 1 else x


def _motion_blur(x, params):
    # a one-sided line kernel at a random angle, Gaussian-weighted along its length (wand's motion_blur)
    radius, sigma = params
    h, w = x.shape[-2:]
    radius = max(1, min(int(radius * min(h, w) / 224) if min(h, w) > 64 else int(radius * min(h, w) / 32), min(h, w) // 2))
    sigma = max(sigma * radius / params[0], 0.5)
    angle = float(torch.empty(()).uniform_(-45, 45)) * math.pi / 180
    k = 2 * radius + 1
    kernel = torch.zeros(k, k)
    for t in range(radius + 1):
        i = int(round(radius + t * math.sin(angle)))
        j = int(round(radius + t * math.cos(angle)))
        kernel[i, j] += math.exp(-(t ** 2) / (2 * sigma ** 2))
    kernel /= kernel.sum()
    c = x.shape[0]
    out = F.conv2d(F.pad(x[None], [radius] * 4, mode="replicate"), kernel.expand(c, 1, k, k), groups=c)
    return out[0].clamp(0, 1)


def _contrast(x, c):
    m = x.mean(dim=(-3, -2, -1), keepdim=True)
    return ((x - m) * c + m).clamp(0, 1)


def _brightness(x, c):
    return (x + c).clamp(0, 1)


def _jpeg(x, quality):
    from torchvision.transforms.v2 import functional as TF  # deferred: torchvision loads only when this runs (start-up)
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8)
    return TF.jpeg(u8, quality=int(quality)).float() / 255


def _pixelate(x, c):
    from torchvision.transforms.v2 import InterpolationMode  # deferred: torchvision loads only when this runs (start-up)
    from torchvision.transforms.v2 import functional as TF  # deferred: torchvision loads only when this runs (start-up)
    h, w = x.shape[-2:]
    small = TF.resize(x, [max(1, int(h * c)), max(1, int(w * c))], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.resize(small, [h, w], interpolation=InterpolationMode.NEAREST)


_FNS: Dict[str, Callable] = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur, "motion_blur": _motion_blur, "contrast": _contrast,
    "brightness": _brightness, "jpeg": _jpeg, "pixelate": _pixelate,
}


class _Corruption:
    """Picklable (for DataLoader workers) corruption at one severity."""

    def __init__(self, name: str, severity: int, small: bool) -> None:
        self.name, self.severity = name, severity
        self.param = _PARAMS[name][1 if small else 0][severity - 1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _FNS[self.name](x, self.param)


def corruption(name: str, severity: int, *, small: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in _PARAMS:
        raise FtwtError(f"unknown corruption '{name}'", f"use one of {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise FtwtError(f"severity {severity} is outside 1-5", "pass severities between 1 and 5")
    return _Corruption(name, severity, small)
