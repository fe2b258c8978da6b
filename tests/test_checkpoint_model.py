"""The model ftwt runs is the checkpoint's: non-finite and integer weights refused, torchvision models that need
care attached exactly, the plain family chosen among networks the weights fit, 16-bit PNGs scaled."""
import argparse

import numpy as np
import pytest
import torch
import torchvision
from helpers import one_line_error
from PIL import Image
from typer.testing import CliRunner

import ftwt_cli
from ftwt_cli.attach import attach
from ftwt_cli.cli import app
from ftwt_cli.data import make_loader, open_data

runner = CliRunner()
FIT = dict(r=0.9, epochs=2, lr=0.05, batch_size=64, workers=0)


def test_non_finite_and_integer_weights_are_refused(tmp_path):
    sd = torchvision.models.resnet18(num_classes=10).state_dict()
    bad = dict(sd, **{"layer1.0.conv1.weight": sd["layer1.0.conv1.weight"].clone().index_fill_(0, torch.tensor([0]), float("nan"))})
    torch.save(bad, tmp_path / "nan.pth")
    one_line_error(runner.invoke(app, ["attach", str(tmp_path / "nan.pth"), "--run", str(tmp_path / "a"), "--arch", "resnet18"]),
                    "tensor layer1.0.conv1.weight holds NaN or infinite values")
    ints = dict(sd, **{"fc.weight": sd["fc.weight"].round().long()})
    torch.save(ints, tmp_path / "int.pth")
    one_line_error(runner.invoke(app, ["attach", str(tmp_path / "int.pth"), "--run", str(tmp_path / "b"),
                                        "--arch", "torchvision:resnet18"]), "fc.weight holds torch.int64 values")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("name,kw", [("mnasnet0_5", {}), ("googlenet", {"aux_logits": True, "init_weights": True})])
def test_torchvision_models_that_need_care_attach_exactly(tmp_path, name, kw):
    torch.manual_seed(0)
    src = torchvision.models.get_model(name, num_classes=10, **kw).eval()
    torch.save(src.state_dict(), tmp_path / "m.pth")
    attach(tmp_path / "m.pth", input_size=(3, 64, 64), run_dir=tmp_path / "run")
    m = ftwt_cli.load(tmp_path / "run").set_gates("open")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x), src(x))


@pytest.mark.integration     # a few seconds each: the default run stays under 6 minutes
def test_weights_that_fit_different_networks_take_the_plain_family_or_the_checkpoints_word(tmp_path):
    import timm
    torch.manual_seed(0)
    sd = timm.create_model("tf_efficientnet_b0", num_classes=10).state_dict()
    torch.save(sd, tmp_path / "plain.pth")
    # a plain state dict states nothing: the plain family, saying which variants also fit and the --arch for them
    res = runner.invoke(app, ["attach", str(tmp_path / "plain.pth"), "--run", str(tmp_path / "a"), "--input-size", "3,32,32"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "chose timm:efficientnet_b0 (the family's plain name" in out
    assert "timm:efficientnet_blur_b0, timm:tf_efficientnet_b0, which compute another function" in out
    assert "pass --arch timm:efficientnet_blur_b0" in out
    # a timm train.py checkpoint says what it is (and carries its argparse.Namespace of arguments)
    torch.save({"epoch": 3, "arch": "tf_efficientnet_b0", "state_dict": sd, "version": 2,
                "args": argparse.Namespace(model="tf_efficientnet_b0", lr=0.1)}, tmp_path / "train.pth.tar")
    rep = attach(tmp_path / "train.pth.tar", input_size=(3, 64, 64), run_dir=tmp_path / "b")
    assert rep.arch == "timm:tf_efficientnet_b0"


def test_sixteen_bit_pngs_are_scaled_not_clipped(tmp_path):
    for split in ("train", "val"):
        for c, level in (("dark", 8192), ("light", 57344)):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            Image.fromarray(np.full((8, 8), level, dtype=np.uint16)).save(d / "a.png")
    from ftwt_cli.arch import DataConfig
    cfg = DataConfig((1, 8, 8), (0.0,), (1.0,), "bilinear", 1.0, "center")
    x, y = next(iter(make_loader(open_data(str(tmp_path / "data"), cfg, num_classes=2).val, 2, train=False, workers=0)))
    got = {int(label): float(img.mean()) for img, label in zip(x, y)}
    assert got[0] == pytest.approx(8192 / 65535, abs=1 / 255) and got[1] == pytest.approx(57344 / 65535, abs=1 / 255)
