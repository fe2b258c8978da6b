"""Device, mixed precision and memory format: the code path a GPU takes, run on the CPU (bf16 autocast, fp16 with a
GradScaler), and the core on every device this machine has."""
import math

import pytest
import torch
import torchvision
from typer.testing import CliRunner

import ftwt_cli
from ftwt_cli.arch import trace_plan
from ftwt_cli.cli import app
from ftwt_cli.formats import read_meta
from ftwt_cli.gating import GatedModel
from ftwt_cli.runtime.device import resolve_precision
from ftwt_cli.train import FinetuneConfig, FitGatesConfig, finetune, fit_gates

runner = CliRunner()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here"))]
FIT = dict(r=0.9, epochs=1, lr=0.05, batch_size=64, workers=0)


@pytest.mark.parametrize("device", DEVICES)
def test_gated_forward_and_macs_live_on_the_device(device):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    g = GatedModel(net, trace_plan(net, (3, 32, 32))).eval().to(device).set_gates("oracle", r=0.8)
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad(), g.collecting():
        g(x)
    s = g.last_stats
    assert s.macs.device.type == device and all(m.device.type == device for m in s.masks.values())
    assert all(t.device.type == device for t in g.last_targets.values()) and (s.macs < s.dense_macs).all()


@pytest.mark.integration      # trains for tens of seconds on a 2-core CPU without AVX-512
def test_bf16_autocast_keeps_masks_and_fits(run):
    """Under bf16 autocast (what CUDA takes by default) the predicted masks agree with float32 on ≥ 99% of decisions,
    and fit-gates and finetune train with finite losses."""
    fit_gates(run, "digits", FitGatesConfig(**FIT), train_samples=256, device="cpu", amp="off")
    m = ftwt_cli.load(run)
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m(x)
        ref = {k: v.clone() for k, v in m.last_masks.items()}
        with resolve_precision("cpu", "bf16").autocast():
            m(x)
    same = sum(int((m.last_masks[k] == v).sum()) for k, v in ref.items())
    total = sum(v.numel() for v in ref.values())
    assert same / total >= 0.99, same / total
    rep = fit_gates(run, "digits", FitGatesConfig(**FIT), train_samples=256, device="cpu", amp="bf16")
    assert math.isfinite(rep.epochs[0].loss) and read_meta(run).environment["amp"] == "bf16"
    rep = finetune(run, "digits", FinetuneConfig(epochs=1, batch_size=64, workers=0), train_samples=256, amp="bf16")
    assert math.isfinite(rep.epochs[0].loss) and rep.epochs[0].bce > 0


@pytest.mark.integration      # trains for tens of seconds on a 2-core CPU without AVX-512
def test_fp16_with_a_grad_scaler_steps_both_optimisers(run):
    fit_gates(run, "digits", FitGatesConfig(**FIT), train_samples=128, amp="fp16")
    before = {k: v.clone() for k, v in ftwt_cli.load(run).state_dict().items()}
    rep = finetune(run, "digits", FinetuneConfig(epochs=1, batch_size=64, workers=0), train_samples=128, amp="fp16")
    assert math.isfinite(rep.epochs[0].loss)
    after = ftwt_cli.load(run).state_dict()
    moved = {k.split(".")[0] for k in after if not torch.equal(before[k], after[k])}
    assert moved == {"backbone", "gates"}                 # both optimisers stepped through the one scaler
    ck = torch.load(run / read_meta(run).files.checkpoint, weights_only=True)
    assert "scale" in ck["scaler"]                        # the scaler's state resumes with the run


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("args,expect", [
    (["--device", "cuda"], "has no usable CUDA GPU"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--amp", "half"], "'half' is not one of 'auto', 'bf16', 'fp16', 'off'"),
])
def test_devices_and_amp_this_machine_cannot_run_are_one_line(run, args, expect):
    res = runner.invoke(app, ["fit-gates", "--data", "digits", "--run", str(run), *args])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and expect in res.stderr, res.output
    assert {p.name for p in run.iterdir()} == {"ftwt.json", "weights.safetensors"}
