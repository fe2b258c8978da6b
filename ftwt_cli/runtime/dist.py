"""Many processes through ``torchrun``: torch.distributed and DistributedDataParallel, as timm's and torchvision's
reference training scripts use them.

Under torchrun (``WORLD_SIZE`` in the environment) every process joins one process group (nccl on GPUs, gloo on
CPUs), takes the GPU of its ``LOCAL_RANK``, reads its own shard of each epoch (``DistributedSampler`` seeded from the
run's seed and the epoch; the batch size is per process), and trains one DDP-wrapped ``GatedModel`` that holds the
backbone and the gates, so the gating hooks run inside DDP's forward and every gradient is all-reduced. Only rank 0
writes the run, draws progress and prints; metrics are reduced as sums of counts; evaluation shards the validation
set without padding and gathers every sample exactly once.
"""
from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, Subset

from ..errors import FtwtError

__all__ = ["Dist", "launched_rank", "process_group", "setup", "shard", "train_sampler", "all_sum", "all_sum_tensor", "gather_cat", "average_buffers", "barrier"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (rank 0 of 1 outside torchrun)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False          # launched by torchrun: a process group exists

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_rank() -> int:
    """This process's rank in the torchrun job, from the environment torchrun sets (0 outside torchrun): what a
    command needs to know before it joins the process group (only rank 0 prints and takes the run's lock)."""
    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple]:
    """(Dist, device) for the length of a command: joins the process group under torchrun, and leaves it at the end
    (a process that exits with its group alive can abort in gloo's destructor). Nested inside another
    ``process_group`` (``ftwt sweep`` runs several commands in one job) it joins the outer group and leaves it alone."""
    owned = not (dist.is_available() and dist.is_initialized())
    d, dev = setup(device)
    ok = False
    try:
        yield d, dev
        ok = True
    finally:
        if owned and d.active and dist.is_initialized():
            gc.collect()                # DDP's reducer (in reference cycles) goes before its process group
            if ok:
                dist.barrier()          # every process done with its collectives
            dist.destroy_process_group()


def setup(device: torch.device) -> tuple:
    """(Dist, device): join the process group when launched by torchrun, with each process on its own GPU."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return Dist(), device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise FtwtError(f"process {rank} has LOCAL_RANK {local} but this node has {torch.cuda.device_count()} GPU(s)",
                            "start at most one process per GPU: torchrun --nproc-per-node N")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, True), device


def train_sampler(ds: Dataset, d: Dist, seed: int, epoch: int) -> DistributedSampler:
    """This process's shard of the epoch: one permutation per (seed, epoch) for all processes, no duplicates."""
    s = DistributedSampler(ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed, drop_last=True)
    s.set_epoch(epoch)
    return s


def shard(ds: Dataset, d: Dist) -> Dataset:
    """Every ``world``-th sample from ``rank``: each sample in exactly one process, none padded."""
    return ds if not d.active else Subset(ds, list(range(d.rank, len(ds), d.world)))


def all_sum(values: Dict[str, float], d: Dist, device: torch.device) -> Dict[str, float]:
    """Each value summed over the processes (float64, exact for counts)."""
    if not d.active or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_sum_tensor(t: torch.Tensor, d: Dist, device: torch.device) -> torch.Tensor:
    """A tensor summed elementwise over the processes (on the CPU)."""
    if not d.active:
        return t
    x = t.to(device).clone()
    dist.all_reduce(x)
    return x.cpu()


def gather_cat(t: torch.Tensor, d: Dist, device: torch.device) -> torch.Tensor:
    """The processes' 1-D tensors of any lengths, concatenated in rank order (on the CPU)."""
    if not d.active:
        return t
    n = torch.tensor([t.numel()], device=device)
    sizes: List[torch.Tensor] = [torch.zeros_like(n) for _ in range(d.world)]
    dist.all_gather(sizes, n)
    width = int(max(int(s) for s in sizes))
    padded = torch.zeros(width, dtype=t.dtype, device=device)
    padded[:t.numel()] = t.to(device)
    parts = [torch.zeros_like(padded) for _ in range(d.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s)] for p, s in zip(parts, sizes)]).cpu()


def average_buffers(model: torch.nn.Module, d: Dist) -> None:
    """Make every process's buffers equal at an epoch's end: floating ones (BatchNorm running statistics, which
    each process updated from its own batches) averaged, the others (counters) taken from rank 0. timm's train.py
    does the same (``--dist-bn reduce``)."""
    if not d.active:
        return
    for b in model.buffers():
        if b.is_floating_point():
            dist.all_reduce(b)
            b.div_(d.world)
        else:
            dist.broadcast(b, 0)


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()
