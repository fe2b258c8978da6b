"""Where training and evaluation run: the device, mixed precision and memory format.

``--device auto`` is CUDA when available, else the CPU. ``--amp auto`` is bfloat16 autocast on GPUs that support
it, float16 with a GradScaler on older GPUs, and off on the CPU; ``bf16`` and ``fp16`` can be asked for on the CPU
too (the code path a GPU takes, testable anywhere). Ground-truth scores, the ranking and the gate loss stay float32
whatever autocast does (``GatedModel`` and ``gate_loss`` cast). ``channels_last`` defaults to on for CUDA.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager, Optional

import torch

from ..errors import FtwtError
from ..settings import AMP_MODES

__all__ = ["AMP_MODES", "Precision", "resolve_device", "resolve_precision"]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` → a device this machine has (one line and exit 2 otherwise)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise FtwtError(f"unknown device '{name}'", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FtwtError(f"--device {name} but this machine has no usable CUDA GPU", "pass --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FtwtError(f"--device {name} but this machine has {torch.cuda.device_count()} GPU(s)",
                            f"pass --device cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise FtwtError(f"unsupported device '{name}'", "use auto, cpu, cuda or cuda:N")
    return dev


@dataclass(frozen=True)
class Precision:
    """A device with its autocast dtype (None: float32) and memory format."""
    device: torch.device
    dtype: Optional[torch.dtype] = None
    channels_last: bool = False

    @property
    def amp(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "off")

    def autocast(self) -> ContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def scaler(self) -> Optional[torch.amp.GradScaler]:
        """float16 needs its loss scaled (one scaler for every optimiser of a step); bfloat16 does not."""
        return torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


def resolve_precision(device: str = "auto", amp: str = "auto", channels_last: Optional[bool] = None) -> Precision:
    dev = resolve_device(device)
    if amp not in AMP_MODES:
        raise FtwtError(f"unknown --amp '{amp}'", f"use one of {', '.join(AMP_MODES)}")
    if amp == "auto":
        dtype = None if dev.type == "cpu" else (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    elif amp == "bf16":
        if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise FtwtError(f"--amp bf16 but {torch.cuda.get_device_name(dev)} has no bfloat16 support",
                            "pass --amp fp16 (or auto)")
        dtype = torch.bfloat16
    else:
        dtype = torch.float16 if amp == "fp16" else None
    return Precision(dev, dtype, dev.type == "cuda" if channels_last is None else channels_last)
