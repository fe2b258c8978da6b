"""ftwt demo: the main job on its built-in default (digits here, so the test is quick and always possible)."""
import pytest
import torch
from typer.testing import CliRunner

import ftwt_cli
from ftwt_cli.cli import app


@pytest.mark.integration
def test_demo_on_digits(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--data", "digits", "--dir", str(tmp_path / "demo"), "--workers", "0"])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "1/6 training a ResNet-18 baseline" in out and "6/6 ftwt export" in out
    assert "before (the baseline checkpoint)" in out and "after (gated, r=0.92)" in out
    assert "time per step: baseline" in out and "fit-gates" in out.split("time per step:")[1]
    assert "baseline top-1" in out
    d = tmp_path / "demo"
    assert (d / "baseline-resnet18.pth").is_file() and (d / "report.md").is_file()
    m = ftwt_cli.load(d / "resnet18-ftwt.safetensors")
    e = m.meta.evaluation
    assert e["top1"] > 0.9 and e["reduction"] > 0.05      # a real, trained model that really got cheaper
    res = CliRunner().invoke(app, ["demo", "--data", "digits", "--dir", str(d)])
    assert res.exit_code == 2 and "already exists" in res.stderr


def test_demo_baseline_starts_from_the_same_weights_every_run(tmp_path, monkeypatch):
    from ftwt_cli import demo
    seen = []

    class Stop(Exception):
        pass

    def capture(model, *args, **kwargs):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        raise Stop
    monkeypatch.setattr(demo, "train_classifier", capture)
    for i in range(2):
        torch.manual_seed(i)             # whatever ran before in the process must not matter
        with pytest.raises(Stop):
            demo.run_demo(tmp_path / f"d{i}", data="digits", workers=0, log=lambda line: None)
    assert all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0])


def test_ctrl_c_in_demo_does_not_suggest_resume(tmp_path, monkeypatch):
    from ftwt_cli import demo

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(demo, "train_classifier", interrupt)
    res = CliRunner().invoke(app, ["demo", "--data", "digits", "--dir", str(tmp_path / "d"), "--workers", "0"])
    assert res.exit_code == 130 and "--resume" not in res.stderr and "ftwt demo --force" in res.stderr


def test_demo_fashion_mnist_subset_is_idx_files_the_loader_reads(tmp_path):
    from ftwt_cli.arch import DataConfig
    from ftwt_cli.data import FASHION_MNIST_DIR, open_data
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("Fashion-MNIST (Debian dataset-fashion-mnist) is not installed")
    from ftwt_cli.demo import write_fashion_subset
    folder = write_fashion_subset(tmp_path / "fm", 300, 100)
    cfg = DataConfig((3, 32, 32), (0.3,) * 3, (0.35,) * 3, "bilinear", 1.0, "center")
    s = open_data(str(folder), cfg, num_classes=10)
    assert len(s.train) == 300 and len(s.val) == 100 and s.kind == "fashion-mnist" and s.classes[0] == "T-shirt/top"
    full = open_data("fashion-mnist", cfg, num_classes=10)
    x, y = s.val[0]
    assert any(torch.equal(x, full.val[i][0]) and y == full.val[i][1] for i in range(len(full.val)))
