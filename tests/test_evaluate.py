"""ftwt evaluate: report numbers, files, OOD shifts, and the MACs count checked on real images."""
import json

import pytest
import torch
import torchvision
from helpers import MacsMeter, no_natural_zeros
from typer.testing import CliRunner

from ftwt_cli.arch import DataConfig
from ftwt_cli.attach import attach
from ftwt_cli.cli import app
from ftwt_cli.data import make_loader, open_data
from ftwt_cli.errors import FtwtError
from ftwt_cli.eval import evaluate_run
from ftwt_cli.eval.ood import CORRUPTIONS, corruption
from ftwt_cli.eval.report import REPORT_FILES, write_report

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("eval")
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), d / "r18.pth")
    attach(d / "r18.pth", arch="torchvision:resnet18", input_size=(3, 16, 16), run_dir=d / "run")
    return d / "run"


def test_report_numbers_and_files(run, tmp_path):
    rep = evaluate_run(run, "digits", gates="oracle", r=0.9, corruptions=("gaussian_noise", "contrast"),
                       severities=(1, 5), ood_samples=64, workers=0)
    assert rep.samples == 359 and 0 < rep.reduction < 1 and rep.macs_mean < rep.dense_macs
    assert rep.macs_p10 <= rep.macs_p50 <= rep.macs_p90 and len(rep.macs_per_sample) == 359
    assert rep.gate_macs > 0 and len(rep.layers) == 17 and all(0 <= l.keep_mean <= 1 for l in rep.layers)
    assert [(s.shift, s.severity) for s in rep.ood] == [("gaussian_noise", 1), ("gaussian_noise", 5), ("contrast", 1), ("contrast", 5)]
    open_only = evaluate_run(run, "digits", gates="open", workers=0)
    assert open_only.top1 == pytest.approx(rep.top1_open) and open_only.reduction == 0 and open_only.gate_macs == 0
    files = write_report(rep, tmp_path)
    assert sorted(p.name for p in files) == sorted(REPORT_FILES)
    d = json.loads((tmp_path / "report.json").read_text())
    assert d["reduction"] == pytest.approx(rep.reduction) and len(d["ood_summary"]) == 2
    md = (tmp_path / "report.md").read_text()
    assert "| reduction |" in md and "Out of distribution" in md
    assert (tmp_path / "ood.png").read_bytes()[:4] == b"\x89PNG"


def test_ood_draws_repeat_and_are_shared_by_both_passes(run):
    """Without DataLoader workers the corruptions draw from this process's RNG: the same corrupted images whatever ran
    before, and the same for the gated and the open pass."""
    def shifts(seed, gates="oracle"):
        torch.manual_seed(seed)                    # whatever the caller's RNG state
        return evaluate_run(run, "digits", gates=gates, r=0.9, corruptions=("gaussian_noise", "impulse_noise"),
                            severities=(5,), ood_samples=64, workers=0).ood
    a, b = shifts(1), shifts(2)
    assert [(s.shift, s.macs, s.top1_gated, s.top1_open) for s in a] == [(s.shift, s.macs, s.top1_gated, s.top1_open) for s in b]
    assert all(s.top1_gated == s.top1_open for s in shifts(1, gates="open"))


def test_predict_needs_fitted_gates(run):
    with pytest.raises(FtwtError, match="not fitted yet"):
        evaluate_run(run, "digits", gates="predict", workers=0)


def test_dynamic_macs_on_real_images_match_zero_channel_count():
    """The independent hook-based count of test_macs, on real digits images instead of noise."""
    torch.manual_seed(0)
    m = no_natural_zeros(torchvision.models.resnet18(num_classes=10)).eval()
    from ftwt_cli.arch.trace import trace_plan
    from ftwt_cli.gating.model import GatedModel
    g = GatedModel(m, trace_plan(m, (3, 32, 32))).eval().set_gates("oracle", r=0.9)
    data = open_data("digits", DataConfig((3, 32, 32), (0.5,) * 3, (0.25,) * 3))
    x, _ = next(iter(make_loader(data.val, 16, train=False, workers=0)))
    measured = MacsMeter(g).run(x)
    assert torch.allclose(g.last_stats.macs, measured, rtol=1e-12)
    assert (g.last_stats.macs < g.last_stats.dense_macs).all()


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("small", [True, False])
def test_corruptions_are_bounded_and_grow_with_severity(name, small):
    torch.manual_seed(0)
    x = torch.rand(3, 32, 32) * 0.6 + 0.2
    diffs = []
    for sev in (1, 5):
        torch.manual_seed(1)
        y = corruption(name, sev, small=small)(x)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
        diffs.append(float((y - x).abs().mean()))
    assert diffs[1] >= diffs[0] > 0


@pytest.mark.parametrize("args,expect", [
    (["--gates", "nope", "--data", "digits"], "'nope' is not one of 'open', 'predict', 'oracle'"),
    (["--r", "abc", "--data", "digits"], "Invalid value for '--r'"),
    (["--gates", "oracle", "--data", "digits"], "needs --r"),
    (["--gates", "open"], "never trained"),
    (["--gates", "oracle", "--r", "2", "--data", "digits"], "outside (0, 1]"),
    (["--gates", "open", "--data", "digits", "--corruption", "fog"], "unknown corruption 'fog'"),
])
def test_cli_bad_input(run, args, expect):
    res = runner.invoke(app, ["evaluate", "--run", str(run), "--workers", "0", *args])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0]
    assert not (run / "report.json").exists()


@pytest.mark.integration
def test_cli_writes_report(run):
    res = runner.invoke(app, ["evaluate", "--run", str(run), "--data", "digits", "--gates", "oracle", "--r", "0.9",
                              "--workers", "0", "--corruption", "jpeg", "--ood-samples", "32"])
    assert res.exit_code == 0, res.output
    assert "reduction" in res.stdout and "jpeg" in res.stdout
    assert all((run / f).is_file() for f in REPORT_FILES)
    # off a terminal, every pass is a line "pass k of N", the last one k = N (oracle and open, 5 severities each)
    import re
    passes = [(int(a), int(b)) for a, b in re.findall(r"pass (\d+) of (\d+)", res.stdout)]
    assert passes and passes[-1][0] == passes[-1][1] and [k for k, _ in passes] == list(range(1, len(passes) + 1))
    assert passes[-1][1] >= 12


def test_unreadable_image_in_a_worker_is_one_line(tmp_path, run):
    import numpy as np
    from PIL import Image
    for split in ("train", "val"):
        for c in range(10):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / split / f"c{c}" / "a.png")
    (tmp_path / "val" / "c3" / "bad.png").write_bytes(b"not an image")
    res = runner.invoke(app, ["evaluate", "--run", str(run), "--data", str(tmp_path), "--gates", "open", "--workers", "1"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot read image" in lines[0] and "bad.png" in lines[0] and "Traceback" not in res.stderr


@pytest.mark.integration
def test_predicted_gates_report_whether_per_image_choice_pays(tmp_path, digits_r18):
    """On a trained model with fitted gates: the share of decisions that vary, the gates' majority decisions frozen
    into one static mask at the same MACs (its top-1 beside the gates'), and FTWT's counter beside the exact count."""
    from ftwt_cli.attach import attach
    from ftwt_cli.train import FitGatesConfig, fit_gates
    run = tmp_path / "run"
    attach(digits_r18, run_dir=run, arch="torchvision:resnet18", input_size=(3, 16, 16), mean=(0.33,) * 3, std=(0.38,) * 3,
           crop_pct=1.0)
    fit_gates(run, "digits", FitGatesConfig(r=0.9, epochs=1, lr=0.05, batch_size=64, workers=0))
    rep = evaluate_run(run, "digits", workers=0)
    assert rep.gates == "predict" and 0 <= rep.varying_share <= 1
    assert 0 < rep.frozen_top1 <= 1 and abs(rep.frozen_macs - rep.macs_mean) <= 0.1 * rep.dense_macs
    assert rep.frozen_bn_images == 1797 - 1797 // 5        # BN re-estimated under the frozen mask, on every training image
    # the run's own statistics come back after the control: a pass after it (--ood-data, here the same images) scores
    # what the first pass scored
    again = evaluate_run(run, "digits", workers=0, ood_data="digits")
    assert (again.ood[0].top1_gated, again.ood[0].top1_open) == (again.top1, again.top1_open) == (rep.top1, rep.top1_open)
    assert evaluate_run(run, "digits", workers=0, frozen_bn_images=0).frozen_bn_images == 0
    assert 0 < rep.ftwt_counter_macs < rep.dense_macs
    assert len(rep.correct) == rep.samples and sum(rep.correct) == round(rep.top1 * rep.samples)
    md = (tmp_path / "out")
    write_report(rep, md)
    text = (md / "report.md").read_text()
    assert "frozen into one static mask" in text and "BatchNorm re-estimated under it" in text
    assert "FTWT's released counter" in text
    assert "correct" not in json.loads((md / "report.json").read_text())
