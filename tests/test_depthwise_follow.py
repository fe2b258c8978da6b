"""attach --depthwise-follow end to end: the run records the followers, the compact path and the ONNX graph compute
what the masked model computes, and a model without inverted residuals refuses the option in one line."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from helpers import no_natural_zeros, one_line_error
from typer.testing import CliRunner

import ftwt_cli
from ftwt_cli.attach import attach
from ftwt_cli.cli import app
from ftwt_cli.errors import FtwtError
from ftwt_cli.fast import make_compact
from ftwt_cli.runs.onnx import onnx_module

runner = CliRunner()


@pytest.fixture
def mbv2_run(tmp_path):
    torch.manual_seed(0)
    m = no_natural_zeros(torchvision.models.mobilenet_v2(num_classes=10)).eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.running_mean.normal_(0, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    torch.save(m.state_dict(), tmp_path / "mbv2.pth")
    rep = attach(tmp_path / "mbv2.pth", arch="torchvision:mobilenet_v2", input_size=(3, 32, 32), run_dir=tmp_path / "run",
                 depthwise_follow=True)
    followers = [r for r in rep.layers if r.gate_macs == 0]
    assert len(followers) >= 10 and all(r.groups == r.in_channels for r in followers)    # 14 of the 17 at 32 px
    return tmp_path / "run"


def _predicting(run):
    g = ftwt_cli.load(run)
    with torch.no_grad():
        for p in g.gates.parameters():
            p.normal_(0, 0.5)
    return g.set_gates("predict")


# torch.onnx's TorchScript exporter warns about its own deprecation (ftwt's exporter silences it the same way)
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_compact_and_onnx_compute_the_masked_model(mbv2_run, tmp_path):
    g = _predicting(mbv2_run)
    followers = [u for u in g.units if u.follows]
    assert followers and len(g.gates) == len(g.units) - len(followers)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = g(x)
    masks = g.last_stats.masks
    assert all(torch.equal(masks[u.name], masks[u.follows]) for u in followers)
    compact = make_compact(g, calibrate=False)
    with torch.no_grad():
        assert torch.allclose(compact(x), want, atol=1e-4)
    # the graph ftwt export --format onnx writes, with the followers' masks in it
    net = onnx_module(g)
    with torch.no_grad():
        assert torch.allclose(net(x), want, atol=1e-5)
    torch.onnx.export(net, (x,), str(tmp_path / "m.onnx"), input_names=["image"], dynamo=False,
                      dynamic_axes={"image": {0: "batch"}})
    s = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = s.run(None, {"image": x.numpy()})[0]
    assert np.abs(got - want.numpy()).max() <= 1e-4


def test_a_model_without_inverted_residuals_refuses_the_option(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(FtwtError, match="no depthwise conv"):
        attach(tmp_path / "r18.pth", arch="torchvision:resnet18", input_size=(3, 16, 16), run_dir=tmp_path / "run",
               depthwise_follow=True)
    res = runner.invoke(app, ["attach", str(tmp_path / "r18.pth"), "--arch", "torchvision:resnet18", "--input-size",
                              "3,16,16", "--run", str(tmp_path / "run"), "--depthwise-follow"])
    one_line_error(res, "--depthwise-follow")
    assert not (tmp_path / "run").exists()
