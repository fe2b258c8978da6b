"""Where one command runs, decided once: the device with its precision and memory format, and this process's place
in the torchrun job. Training, evaluation and the sweep open a ``Session`` and pass it on by keyword."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .device import Precision, resolve_precision
from .dist import Dist, process_group

__all__ = ["Session", "session"]


@dataclass(frozen=True)
class Session:
    precision: Precision          # its device is this process's own (cuda:LOCAL_RANK under torchrun)
    dist: Dist = Dist()

    @property
    def device(self) -> torch.device:
        return self.precision.device

    @property
    def main(self) -> bool:
        """This process writes runs and prints (rank 0)."""
        return self.dist.main


@contextlib.contextmanager
def session(device: str = "auto", amp: str = "auto", channels_last: Optional[bool] = None) -> Iterator[Session]:
    """Resolve ``--device``/``--amp``/``--channels-last``, join the process group under torchrun (leaving it at the
    end), and put the precision on this process's own device."""
    precision = resolve_precision(device, amp, channels_last)
    with process_group(precision.device) as (d, dev):
        yield Session(dataclasses.replace(precision, device=dev), d)
