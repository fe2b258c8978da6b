"""``ftwt demo``: the main job end to end on a built-in default, in a few minutes on a laptop CPU.

Trains a torchvision ResNet-18 baseline at 32 px on Fashion-MNIST (Debian package dataset-fashion-mnist,
when installed; a 20k-image training subset) or else on scikit-learn's bundled digits, saves it as a plain
state dict, then runs attach → fit-gates → finetune → evaluate → export on it.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .arch.registry import DataConfig
from .attach import attach
from .data import FASHION_MNIST_DIR, DataSplits, make_loader, open_data
from .errors import FtwtError
from .eval.evaluate import EvalReport, evaluate_run
from .eval.report import write_report
from .io.export import export
from .io.rundir import atomic_write_text, inside
from .train.config import FinetuneConfig, FitGatesConfig
from .train.loops import Progress, finetune, fit_gates

__all__ = ["DemoSettings", "DemoResult", "run_demo", "train_classifier", "demo_settings"]


DEMO_MARKER = ".ftwt-demo"          # marks a folder `ftwt demo` made, the only kind --force replaces


@dataclass(frozen=True)
class DemoSettings:
    data: str
    mean: float
    std: float
    train_samples: Optional[int]
    baseline_epochs: int
    fit_epochs: int
    ft_epochs: int
    r: float = 0.92
    batch_size: int = 128


def demo_settings(data: Optional[str] = None) -> DemoSettings:
    if data is None:
        data = "fashion-mnist" if FASHION_MNIST_DIR.is_dir() else "digits"
    if data == "fashion-mnist":
        return DemoSettings("fashion-mnist", 0.286, 0.353, 20000, baseline_epochs=2, fit_epochs=1, ft_epochs=1)
    if data == "digits":
        return DemoSettings("digits", 0.33, 0.38, None, baseline_epochs=15, fit_epochs=3, ft_epochs=3, batch_size=64)
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


def train_classifier(model: nn.Module, data: DataSplits, epochs: int, *, lr: float = 0.05, batch_size: int = 128,
                     workers: Optional[int] = None, log: Callable[[str], None] = print,
                     device: str = "cpu") -> nn.Module:
    """Plain supervised training (SGD + Nesterov, cosine): how a user's baseline checkpoint would be made."""
    from .train.device import resolve_device
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
    import torchvision
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
    cfg = DataConfig((3, 32, 32), (s.mean,) * 3, (s.std,) * 3, "bilinear", 1.0, "center")
    splits = open_data(s.data, cfg, num_classes=10, train_samples=s.train_samples)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    atomic_write_text(folder / DEMO_MARKER, "made by `ftwt demo`; `ftwt demo --force` may replace this folder\n")
    log(f"1/6 training a ResNet-18 baseline on {splits.source} ({len(splits.train)} images, 32 px)")
    torch.manual_seed(0)                 # the baseline's initial weights too: every demo run trains the same one
    model = train_classifier(torchvision.models.resnet18(num_classes=10), splits, s.baseline_epochs,
                             batch_size=s.batch_size, workers=workers, log=log, device=device)
    ckpt = folder / "baseline-resnet18.pth"
    torch.save(model.state_dict(), ckpt)
    run = folder / "run"
    log(f"2/6 ftwt attach {ckpt}")
    rep = attach(ckpt, arch="torchvision:resnet18", input_size=(3, 32, 32), mean=cfg.mean, std=cfg.std, run_dir=run)
    base = evaluate_run(run, s.data, gates="open", workers=workers, device=device, amp=amp)
    log(f"    {rep.arch}: {len(rep.layers)} gated layers, {rep.dense_macs / 1e6:.1f} M MACs dense, baseline top-1 {base.top1:.2%}")
    log(f"3/6 ftwt fit-gates --r {s.r}")
    fit_gates(run, s.data, FitGatesConfig(r=s.r, epochs=s.fit_epochs, batch_size=s.batch_size, workers=workers),
              train_samples=s.train_samples, progress=progress, device=device, amp=amp)
    log("4/6 ftwt finetune")
    finetune(run, s.data, FinetuneConfig(epochs=s.ft_epochs, batch_size=s.batch_size, workers=workers),
             train_samples=s.train_samples, progress=progress, device=device, amp=amp)
    log("5/6 ftwt evaluate")
    ev = evaluate_run(run, s.data, gates="predict", workers=workers, device=device, amp=amp)
    write_report(ev, run)
    log("6/6 ftwt export")
    out = export(run, folder / "resnet18-ftwt.safetensors")
    return DemoResult(folder, ckpt, run, out.path, ev, base.top1, time.time() - t0)
