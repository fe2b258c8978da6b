"""attach --residual-stream: each residual block's output is a unit, masked after its add (FTWT's --gtafterblock). The
tracer finds the blocks from the dataflow, the exact count equals what the convs really read and write, the compact
path and the ONNX graph compute the masked model, a run fits, evaluates and benches end to end, and a model without
residual blocks (or a hybrid of such a run) is refused in one line."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import MacsMeter, no_natural_zeros, one_line_error
from typer.testing import CliRunner

import ftwt_cli
from ftwt_cli.arch.trace import trace_plan
from ftwt_cli.attach import attach
from ftwt_cli.cli import app
from ftwt_cli.errors import FtwtError
from ftwt_cli.fast import make_compact
from ftwt_cli.gating import GatedModel
from ftwt_cli.runs.onnx import onnx_module

runner = CliRunner()


class Block(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), the shortcut an identity or a strided 1×1 conv + norm."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()      # modules: no_natural_zeros swaps them for LeakyReLU

    def forward(self, x):
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(Block(8, 8), Block(8, 16, 2), Block(16, 16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class Plain(nn.Module):
    """conv → norm → relu twice, no residual sum."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def _randomised(m: nn.Module) -> nn.Module:
    """No natural zeros, and BN statistics away from (0, 1), so folding and masking are really tested."""
    m = no_natural_zeros(m).eval()
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.normal_(0, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    return m


def _predicting(g: GatedModel) -> GatedModel:
    """Gates that decide something: random weights, a bias that keeps about half of the channels."""
    with torch.no_grad():
        for gate in g.gates.values():
            gate.fc.weight.normal_(0, 0.5)
            gate.fc.bias.fill_(0.2)
    return g.set_gates("predict")


def test_the_tracer_finds_residual_blocks_and_the_convs_feeding_their_sums():
    torch.manual_seed(0)
    plan = trace_plan(TinyResNet().eval(), (3, 16, 16), residual_stream=True)
    streams = {u.name: u for u in plan.units if u.kind == "stream"}
    assert list(streams) == ["blocks.0", "blocks.1", "blocks.2"]          # the innermost modules, not "blocks"
    assert streams["blocks.0"].computes == ("blocks.0.conv2",) and streams["blocks.0"].computes_ends == ("blocks.0.bn2",)
    assert streams["blocks.1"].computes == ("blocks.1.conv2", "blocks.1.down.0")
    assert streams["blocks.1"].computes_ends == ("blocks.1.bn2", "blocks.1.down.1")
    assert (streams["blocks.1"].in_channels, streams["blocks.1"].out_channels) == (8, 16)
    names = {u.name for u in plan.units}
    assert not names & {"blocks.0.conv2", "blocks.1.conv2", "blocks.2.conv2"}     # replaced by the block's unit
    assert {"stem.0", "blocks.0.conv1", "blocks.1.conv1", "blocks.2.conv1"} <= names
    by = {u.name: u for u in plan.units}
    ops = {o.name: o for o in plan.ops}
    # the next block's convs read the stream: the stem's mask into block 0, block 0's into block 1 ...
    assert streams["blocks.0"].in_expr == ["unit", "stem.0", 8]
    assert by["blocks.1.conv1"].in_expr == ["unit", "blocks.0", 8] == ops["blocks.1.down.0"].in_expr
    assert by["blocks.2.conv1"].in_expr == ["unit", "blocks.1", 16]
    # without the option the same model has conv units only; a model without residual sums has no stream unit
    assert all(u.kind == "conv" for u in trace_plan(TinyResNet().eval(), (3, 16, 16)).units)
    assert not [u for u in trace_plan(Plain().eval(), (3, 16, 16), residual_stream=True).units if u.kind == "stream"]
    # torchvision's ResNet-18: its 8 blocks, the three downsampling ones with their shortcut convs
    r18 = trace_plan(torchvision.models.resnet18(num_classes=10).eval(), (3, 32, 32), residual_stream=True)
    blocks = [u for u in r18.units if u.kind == "stream"]
    assert len(blocks) == 8 and sum(len(u.computes) == 2 for u in blocks) == 3


@pytest.mark.parametrize("build", [TinyResNet, lambda: torchvision.models.resnet18(num_classes=10)])
@pytest.mark.parametrize("mode", ["oracle", "predict"])
def test_stream_macs_match_independent_measurement(build, mode):
    """The exact count equals what the convs really read (structurally non-zero input channels) and write (the
    filters the block's output keeps), gates included; the masked channels of a block's output are exact zeros."""
    torch.manual_seed(0)
    m = _randomised(build())
    plan = trace_plan(m, (3, 32, 32), residual_stream=True)
    g = GatedModel(m, plan, None).eval().set_gates(mode, r=0.85)
    if mode == "predict":
        _predicting(g)
    x = torch.randn(3, 3, 32, 32)
    outs = {}
    blocks = [u.name for u in plan.units if u.kind == "stream"]
    hooks = [m.get_submodule(n).register_forward_hook(lambda mod, a, o, n=n: outs.__setitem__(n, o.detach().clone()))
             for n in blocks]
    measured = MacsMeter(g).run(x)
    for h in hooks:
        h.remove()
    s = g.last_stats
    assert torch.allclose(s.macs, measured, rtol=1e-12), (s.macs, measured)
    assert (s.macs < 0.9 * s.dense_macs).all() and (s.gate_macs > 0).all()
    for n in blocks:
        mask = s.masks[n]
        assert 0 < float(mask.float().mean()) < 1
        dropped = outs[n].abs().amax((2, 3))[~mask]
        assert dropped.numel() and float(dropped.max()) == 0.0


def test_masking_the_stream_costs_fewer_macs_than_masking_before_the_add():
    """The same keep ratio per block costs less when the mask is after the add: the next block's conv1 and the
    shortcut read only the kept channels (savings with the square of the keep ratio)."""
    torch.manual_seed(0)
    m = _randomised(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    cost = {}
    for stream in (False, True):
        g = GatedModel(m, trace_plan(m, (3, 32, 32), residual_stream=stream), None).eval().set_gates("oracle", r=0.8)
        with torch.no_grad():
            g(x)
        cost[stream] = float((g.last_stats.macs / g.last_stats.dense_macs).mean())
        g._remove_hooks()
    assert cost[True] < cost[False] - 0.05, cost


# torch.onnx's TorchScript exporter warns about its own deprecation (ftwt's exporter silences it the same way)
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("build", [TinyResNet, lambda: torchvision.models.resnet18(num_classes=10)])
def test_compact_and_onnx_compute_the_masked_model(build, tmp_path):
    torch.manual_seed(0)
    m = _randomised(build())
    g = _predicting(GatedModel(m, trace_plan(m, (3, 32, 32), residual_stream=True), None).eval())
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            want = g(x)
        for calibrate in (False, True):
            compact = make_compact(g, calibrate=calibrate, input_size=(3, 32, 32), reps=2)
            assert "stream" in compact.strategies.values()
            with torch.no_grad():
                assert torch.allclose(compact(x), want, atol=1e-4)
                # replayed masks (ftwt bench): the same outputs
                assert torch.allclose(compact(x, g.last_stats.masks), want, atol=1e-4)
    net = onnx_module(g)
    with torch.no_grad():
        assert torch.allclose(net(x), want, atol=1e-5)
    torch.onnx.export(net, (x,), str(tmp_path / "m.onnx"), input_names=["image"], dynamo=False,
                      dynamic_axes={"image": {0: "batch"}})
    s = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(s.run(None, {"image": x.numpy()})[0] - want.numpy()).max() <= 1e-4


def test_cli_residual_stream_run_fits_evaluates_and_benches(ckpt, tmp_path):
    run = tmp_path / "run"
    res = runner.invoke(app, ["attach", str(ckpt), "--arch", "torchvision:resnet18", "--input-size", "3,16,16",
                              "--run", str(run), "--residual-stream"])
    assert res.exit_code == 0, res.output
    assert "block out" in res.output
    res = runner.invoke(app, ["fit-gates", "--run", str(run), "--data", "digits", "--epochs", "1", "--r", "0.9",
                              "--batch-size", "64", "--workers", "0"])
    assert res.exit_code == 0, res.output
    model = ftwt_cli.load(run)
    streams = [u for u in model.units if u.kind == "stream"]
    assert len(streams) == 8 and model.mode == "predict"
    res = runner.invoke(app, ["evaluate", "--run", str(run), "--data", "digits", "--workers", "0"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["bench", "--run", str(run), "--reps", "3", "--warmup", "1"])
    assert res.exit_code == 0, res.output
    assert "compact" in res.output
    # a hybrid of stream units is not built: refused before any slow work, nothing written
    res = runner.invoke(app, ["hybrid", "--run", str(run), "--data", "digits", "--out", str(tmp_path / "hy")])
    one_line_error(res, "residual-stream")
    assert not (tmp_path / "hy").exists()


def test_a_model_without_residual_blocks_refuses_the_option(tmp_path):
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1(num_classes=10).state_dict(), tmp_path / "sq.pth")
    with pytest.raises(FtwtError, match="no residual block"):
        attach(tmp_path / "sq.pth", arch="torchvision:squeezenet1_1", input_size=(3, 64, 64), run_dir=tmp_path / "run",
               residual_stream=True)
    res = runner.invoke(app, ["attach", str(tmp_path / "sq.pth"), "--arch", "torchvision:squeezenet1_1", "--input-size",
                              "3,64,64", "--run", str(tmp_path / "run"), "--residual-stream"])
    one_line_error(res, "--residual-stream")
    assert not (tmp_path / "run").exists()
