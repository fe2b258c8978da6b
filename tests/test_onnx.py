"""ftwt export --format onnx: onnxruntime reproduces PyTorch's outputs (gated runs with their gates in the graph, static
twins as plain networks), `ftwt bench --onnx` times it beside PyTorch, and bad input is one line with no file."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from helpers import one_line_error
from typer.testing import CliRunner

import ftwt_cli
from ftwt_cli.attach import attach
from ftwt_cli.cli import app
from ftwt_cli.data import make_loader, open_data
from ftwt_cli.errors import FtwtError
from ftwt_cli.runs.onnx import export_onnx

runner = CliRunner()


def _ort(path, x: torch.Tensor) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


def test_gated_graph_reproduces_the_gated_model_on_random_and_real_images(fitted, tmp_path):
    rep = export_onnx(fitted, tmp_path / "m.onnx")
    assert rep.gated and rep.path.stat().st_size == rep.bytes and rep.input_size == (3, 16, 16)
    model = ftwt_cli.load(fitted)
    real, _ = next(iter(make_loader(open_data("digits", model.meta.data_config).val, 32, train=False, workers=0)))
    for x in (torch.randn(5, 3, 16, 16), real):           # two batch sizes: the batch dim is dynamic
        with torch.no_grad():
            want = model(x)
        keep = float(torch.cat([m.float().flatten() for m in model.last_stats.masks.values()]).mean())
        assert 0 < keep < 1                                 # the gates really decide something
        assert np.abs(_ort(rep.path, x) - want.numpy()).max() <= 1e-4
    # the gates matter in the graph: the same weights with open gates give other outputs
    model.set_gates("open")
    with torch.no_grad():
        assert np.abs(_ort(rep.path, real) - model(real).numpy()).max() > 1e-3


def test_a_model_without_gates_is_a_plain_graph(tmp_path):
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pth")
    attach(tmp_path / "r18.pth", arch="torchvision:resnet18", input_size=(3, 16, 16), run_dir=tmp_path / "run")
    rep = export_onnx(tmp_path / "run", tmp_path / "open.onnx")          # gates never fitted: open
    assert not rep.gated
    x = torch.randn(3, 3, 16, 16)
    net = torchvision.models.resnet18(num_classes=10)
    net.load_state_dict(torch.load(tmp_path / "r18.pth"))
    with torch.no_grad():
        assert np.abs(_ort(rep.path, x) - net.eval()(x).numpy()).max() <= 1e-4


@pytest.mark.integration      # the CLI end to end, with a timed onnxruntime session: ~6 s
def test_cli_export_and_bench_onnx(fitted, tmp_path):
    out = tmp_path / "cli.onnx"
    res = runner.invoke(app, ["export", "--run", str(fitted), "--format", "onnx", "--out", str(out)])
    assert res.exit_code == 0 and out.is_file() and "gated ONNX graph" in res.output, res.output
    res = runner.invoke(app, ["bench", "--run", str(fitted), "--onnx", str(out), "--reps", "3", "--warmup", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert '"variant": "onnxruntime"' in res.output and '"variant": "compact"' in res.output


def test_bad_onnx_requests_are_one_line_and_write_nothing(fitted, tmp_path):
    for args, expect in ((["--out", str(tmp_path / "m.pt")], "does not end in .onnx"),
                         (["--out", str(tmp_path / "m.onnx"), "--opset", "3"], "opset 3"),
                         (["--out", str(tmp_path / "m.onnx"), "--backbone-only"], "--backbone-only"),
                         (["--out", str(tmp_path / "m.onnx"), "--format", "tflite"], "tflite")):
        one_line_error(runner.invoke(app, ["export", "--run", str(fitted), "--format", "onnx", *args]), expect)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine.onnx").write_bytes(b"user's")
    with pytest.raises(FtwtError, match="exists"):
        export_onnx(fitted, tmp_path / "mine.onnx")
    assert (tmp_path / "mine.onnx").read_bytes() == b"user's"
    one_line_error(runner.invoke(app, ["bench", "--run", str(fitted), "--onnx", str(tmp_path / "none.onnx")]), "not found")
