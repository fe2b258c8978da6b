"""Shared test helpers: tiny checkpoints written into tmp_path, never anywhere else."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

# helpers.py asserts too (one_line_error): pytest rewrites its asserts so that a failure shows the values
pytest.register_assert_rewrite("helpers")


@pytest.fixture(autouse=True)
def _random_weights_pass_the_source_check(request, monkeypatch):
    """The tests' checkpoints are random-init networks, at chance level by construction: the first-data check of the
    source's accuracy (``eval.source``) would stop every one of them. Off, except in tests marked ``source_check``
    (which test it); the source's accuracy is still measured and recorded everywhere."""
    if request.node.get_closest_marker("source_check") is None:
        import ftwt_cli.eval.source as source
        monkeypatch.setattr(source, "chance_threshold", lambda num_classes, samples: 0.0)


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


@pytest.fixture(scope="session")
def digits_r18(tmp_path_factory) -> Path:
    """A torchvision ResNet-18 really trained on digits at 16 px with mean 0.33 / std 0.38 (about 70% top-1, ~10 s),
    saved as a plain state dict: a source model that is well above chance only with the input config it was
    trained with."""
    import torchvision

    from ftwt_cli.arch import DataConfig
    from ftwt_cli.data import open_data
    from ftwt_cli.demo import train_classifier
    cfg = DataConfig((3, 16, 16), (0.33,) * 3, (0.38,) * 3, "bilinear", 1.0, "center")
    torch.manual_seed(0)
    model = train_classifier(torchvision.models.resnet18(num_classes=10), open_data("digits", cfg, num_classes=10), 4,
                             batch_size=64, workers=0, log=lambda line: None)
    return save_state_dict(model, tmp_path_factory.mktemp("trained") / "digits-r18.pth")


@pytest.fixture(scope="session")
def fitted(tmp_path_factory) -> Path:
    """A random-init ResNet-18 (10 classes, 16 px) attached and fitted one epoch on digits: a run with predicting gates,
    shared read-only by the export and ONNX tests."""
    import torchvision

    from ftwt_cli.attach import attach
    from ftwt_cli.train import FitGatesConfig, fit_gates
    d = tmp_path_factory.mktemp("exp")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), d / "r18.pth")
    attach(d / "r18.pth", arch="torchvision:resnet18", input_size=(3, 16, 16), run_dir=d / "run")
    # a random-init model: at chance, so the source check is off (session fixtures run before conftest's patch)
    fit_gates(d / "run", "digits", FitGatesConfig(r=0.9, epochs=1, lr=0.05, batch_size=64, workers=0), check_source=False)
    return d / "run"
