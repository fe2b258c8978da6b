"""``ftwt demo``: the main job end to end on a built-in default, in a few minutes on a laptop CPU.

Trains a torchvision ResNet-18 baseline at 32 px on Fashion-MNIST (Debian package dataset-fashion-mnist,
when installed: a fixed 8,000/2,000-image subset written into the demo folder as idx files) or else on
scikit-learn's bundled digits, saves it as a plain state dict, then runs attach → fit-gates → finetune →
evaluate → export on it, timing each step. Under 2 minutes on a 2-core CPU.
"""
from __future__ import annotations

import math
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .arch.dataconfig import DataConfig
from .attach import attach
from .data import FASHION_MNIST_DIR, DataSplits, find_idx, make_loader, open_data, read_idx
from .errors import FtwtError
from .eval.report import write_report
from .eval.run import EvalReport, evaluate_run
from .formats.rundir import atomic_write_bytes, atomic_write_text, inside, read_meta
from .runs.exporter import export
from .runtime.device import resolve_device
from .train.config import FinetuneConfig, FitGatesConfig
from .train.loops import Progress, finetune, fit_gates

__all__ = ["DemoSettings", "DemoResult", "run_demo", "train_classifier", "demo_settings"]


DEMO_MARKER = ".ftwt-demo"          # marks a folder `ftwt demo` made, the only kind --force replaces


@dataclass(frozen=True)
class DemoSettings:
    data: str
    mean: float
    std: float
    train_samples: Optional[int]     # Fashion-MNIST: a fixed random subset written into the demo folder
    val_samples: Optional[int]
    baseline_epochs: int
    fit_epochs: int
    ft_epochs: int
    r: float = 0.92
    batch_size: int = 128
    lr: float = 0.05                 # the baseline's SGD learning rate


# Sized to finish in under 2 minutes on a 2-core CPU (benchmarks: README's demo line) while still showing a trained
# model that gets cheaper at a small accuracy change: ResNet-18 at 32 px trains at ~450 images/s there.
def demo_settings(data: Optional[str] = None) -> DemoSettings:
    if data is None:
        data = "fashion-mnist" if FASHION_MNIST_DIR.is_dir() else "digits"
    if data == "fashion-mnist":
        return DemoSettings("fashion-mnist", 0.286, 0.353, 8000, 2000, baseline_epochs=2, fit_epochs=1, ft_epochs=1,
                            lr=0.02)
    if data == "digits":
        return DemoSettings("digits", 0.33, 0.38, None, None, baseline_epochs=15, fit_epochs=2, ft_epochs=2, batch_size=64)
    raise FtwtError(f"unknown demo data '{data}'", "use fashion-mnist or digits")


@dataclass(frozen=True)
class DemoResult:
    folder: Path
    checkpoint: Path
    run_dir: Path
    exported: Path
    report: EvalReport
    baseline_top1: float
    seconds: float
    steps: Tuple[Tuple[str, float], ...] = ()     # (step, seconds) in order


def write_fashion_subset(folder: Path, train: int, val: int, seed: int = 0) -> Path:
    """A fixed random subset of the installed Fashion-MNIST as idx files in ``folder`` (what `--data FOLDER` reads),
    so that every command of the demo, and any the user runs after it, sees the same small data."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for prefix, n in (("train", train), ("t10k", val)):
        x = read_idx(find_idx(FASHION_MNIST_DIR, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(find_idx(FASHION_MNIST_DIR, f"{prefix}-labels-idx1-ubyte"))
        keep = torch.randperm(len(y), generator=g)[:n].sort().values
        x, y = x[keep].contiguous(), y[keep].contiguous()
        atomic_write_bytes(folder / f"{prefix}-images-idx3-ubyte", _idx_bytes(x))
        atomic_write_bytes(folder / f"{prefix}-labels-idx1-ubyte", _idx_bytes(y))
    return folder


def _idx_bytes(t: torch.Tensor) -> bytes:
    """The idx format (MNIST's): zero, type 0x08 (unsigned byte), the number of dimensions, each size big-endian, then
    the bytes (a file format, written once: the NumPy view is the plain way to a tensor's raw bytes)."""
    return struct.pack(f">HBB{t.dim()}I", 0, 0x08, t.dim(), *t.shape) + t.numpy().tobytes()


def train_classifier(model: nn.Module, data: DataSplits, epochs: int, *, lr: float = 0.05, batch_size: int = 128,
                     workers: Optional[int] = None, log: Callable[[str], None] = print,
                     device: str = "cpu") -> nn.Module:
    """Plain supervised training (SGD + Nesterov, cosine): how a user's baseline checkpoint would be made."""
    dev = resolve_device(device)
    model = model.to(dev)
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = max(1, epochs * (len(data.train) // batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    for epoch in range(1, epochs + 1):
        model.train()
        t0, total, n = time.time(), 0.0, 0
        for x, y in make_loader(data.train, batch_size, train=True, workers=workers, seed=0, epoch=epoch):
            loss = F.cross_entropy(model(x.to(dev)), y.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + float(loss.detach()), n + 1
        log(f"baseline epoch {epoch}/{epochs}: loss {total / max(n, 1):.3f} ({time.time() - t0:.0f}s)")
    return model.eval().cpu()


def run_demo(folder: Path | str = "ftwt-demo", *, data: Optional[str] = None, force: bool = False, workers: Optional[int] = None,
             log: Callable[[str], None] = print, progress: Optional[Progress] = None, device: str = "auto",
             amp: str = "auto") -> DemoResult:
    import torchvision  # deferred: torchvision loads only when this runs (start-up)
    t0 = time.time()
    folder = Path(folder)
    if folder.exists():
        if not force:
            raise FtwtError(f"{folder} already exists", "pass --force to replace it, or choose another --dir")
        if not (folder / DEMO_MARKER).is_file():
            raise FtwtError(f"{folder} exists and was not made by `ftwt demo`; --force replaces only demo folders",
                            "choose another --dir, or move the folder away yourself")
        if inside(Path.cwd(), folder):
            raise FtwtError(f"--dir {folder} is the current folder or holds it", "pass a subfolder, e.g. --dir ftwt-demo")
    s = demo_settings(data)
    if s.data == "fashion-mnist" and not FASHION_MNIST_DIR.is_dir():
        raise FtwtError(f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR}",
                        "apt-get install dataset-fashion-mnist, or pass --data digits")
    cfg = DataConfig((3, 32, 32), (s.mean,) * 3, (s.std,) * 3, "bilinear", 1.0, "center")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    atomic_write_text(folder / DEMO_MARKER, "made by `ftwt demo`; `ftwt demo --force` may replace this folder\n")
    data_arg = s.data
    if s.data == "fashion-mnist":
        data_arg = str(write_fashion_subset(folder / "fashion-mnist-subset", s.train_samples, s.val_samples))
    splits = open_data(data_arg, cfg, num_classes=10)
    steps: list = []
    clock = [time.time()]

    def step(text: str) -> None:
        """Log the next step, closing the one before with its elapsed time."""
        now = time.time()
        if steps:
            steps[-1] = (steps[-1][0], now - clock[0])
            log(f"    ({steps[-1][1]:.0f} s)")
        clock[0] = now
        steps.append((text.split(" ", 1)[1], 0.0))
        log(text)

    step(f"1/6 training a ResNet-18 baseline on {splits.source} ({len(splits.train)} images, 32 px)")
    torch.manual_seed(0)                 # the baseline's initial weights too: every demo run trains the same one
    model = train_classifier(torchvision.models.resnet18(num_classes=10), splits, s.baseline_epochs,
                             lr=s.lr, batch_size=s.batch_size, workers=workers, log=log, device=device)
    ckpt = folder / "baseline-resnet18.pth"
    torch.save(model.state_dict(), ckpt)
    run = folder / "run"
    step(f"2/6 ftwt attach {ckpt}")
    rep = attach(ckpt, arch="torchvision:resnet18", input_size=(3, 32, 32), mean=cfg.mean, std=cfg.std, run_dir=run)
    log(f"    {rep.arch}: {len(rep.layers)} gated layers, {rep.dense_macs / 1e6:.1f} M MACs dense")
    step(f"3/6 ftwt fit-gates --r {s.r}")
    # the first data contact: the baseline's own top-1 is measured (and checked) there, then recorded in the run
    fit_gates(run, data_arg, FitGatesConfig(r=s.r, epochs=s.fit_epochs, batch_size=s.batch_size, workers=workers),
              progress=progress, device=device, amp=amp)
    source = read_meta(run).source_eval
    log(f"    baseline top-1 {source.top1:.2%} on {source.samples} test images")
    step("4/6 ftwt finetune")
    finetune(run, data_arg, FinetuneConfig(epochs=s.ft_epochs, batch_size=s.batch_size, workers=workers),
             progress=progress, device=device, amp=amp)
    step("5/6 ftwt evaluate")
    ev = evaluate_run(run, data_arg, gates="predict", workers=workers, device=device, amp=amp)
    write_report(ev, run)
    step("6/6 ftwt export")
    out = export(run, folder / "resnet18-ftwt.safetensors")
    step("- done")
    return DemoResult(folder, ckpt, run, out.path, ev, source.top1, time.time() - t0, tuple(steps[:-1]))
