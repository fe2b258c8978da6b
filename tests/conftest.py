"""Shared test helpers: tiny checkpoints written into tmp_path, never anywhere else."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore")


def save_state_dict(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def r18_ckpt(tmp_path_factory) -> Path:
    """A torchvision ResNet-18 with a 10-class head, saved as a plain state dict (what users have)."""
    import torchvision
    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
    return save_state_dict(torchvision.models.resnet18(num_classes=10), p)


@pytest.fixture(scope="session")
def r18_run(tmp_path_factory, r18_ckpt) -> Path:
    from ftwt_cli.attach import attach
    run = tmp_path_factory.mktemp("runs") / "r18"
    attach(r18_ckpt, arch="torchvision:resnet18", input_size=(3, 32, 32), run_dir=run)
    return run


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A seeded torchvision ResNet-18 (10 classes) saved as a plain state dict in this test's tmp_path."""
    import torchvision
    torch.manual_seed(0)
    return save_state_dict(torchvision.models.resnet18(num_classes=10), tmp_path / "r18.pth")


@pytest.fixture
def run(tmp_path, ckpt) -> Path:
    """A fresh run of ``ckpt`` at 16 px: small enough to train on digits in seconds."""
    from ftwt_cli.attach import attach
    attach(ckpt, arch="torchvision:resnet18", input_size=(3, 16, 16), run_dir=tmp_path / "run")
    return tmp_path / "run"
