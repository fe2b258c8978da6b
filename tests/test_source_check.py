"""The source checkpoint's accuracy on first data contact: measured once and recorded, near chance refused before an
epoch is spent, and every report stating its change against it."""
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import ftwt_cli
from ftwt_cli.attach import attach
from ftwt_cli.cli import app
from ftwt_cli.errors import FtwtError
from ftwt_cli.eval import evaluate_run
from ftwt_cli.eval.source import CHECK_SAMPLES, chance_threshold
from ftwt_cli.formats import read_meta
from ftwt_cli.train import FinetuneConfig, FitGatesConfig, finetune, fit_gates

runner = CliRunner()
FIT = FitGatesConfig(r=0.9, epochs=1, lr=0.05, batch_size=64, workers=0)
TRAINED = dict(arch="torchvision:resnet18", input_size=(3, 16, 16), mean=(0.33,) * 3, std=(0.38,) * 3)


def test_chance_threshold():
    assert chance_threshold(10, 512) == pytest.approx(0.2)
    assert chance_threshold(1000, 512) == pytest.approx(0.001 + 3 * (0.001 * 0.999 / 512) ** 0.5)
    assert chance_threshold(2, 512) == pytest.approx(0.625)
    assert chance_threshold(10, 20) > 0.2           # few images: the guessing classifier's noise decides


@pytest.mark.integration           # trains a real model first (~10 s): with the end-to-end set, to keep the default one short
@pytest.mark.source_check
def test_a_wrong_input_config_is_caught_before_an_epoch(tmp_path, digits_r18):
    """A model trained at mean 0.33 / std 0.38, attached with ImageNet's statistics (what a plain state dict gets):
    fit-gates stops on its first data, naming the settings in use and the flags, and trains nothing."""
    run = tmp_path / "run"
    attach(digits_r18, arch="torchvision:resnet18", input_size=(3, 16, 16), run_dir=run)    # mean/std not stated
    before = read_meta(run)
    with pytest.raises(FtwtError) as e:
        fit_gates(run, "digits", FIT)
    msg = str(e.value)
    assert "near chance" in msg and "mean (0.485, 0.456, 0.406)" in msg and "--mean" in msg and "--no-source-check" in msg
    assert f"on {min(CHECK_SAMPLES, 359)} validation images" in msg
    after = read_meta(run)
    assert not after.training and after.files == before.files and after.source_eval is None
    res = runner.invoke(app, ["fit-gates", "--run", str(run), "--data", "digits", "--workers", "0", "--epochs", "1"])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: the source checkpoint")
    assert "Traceback" not in res.output
    # the model really is this weak? the flag lets it through, and the (weak) accuracy is still recorded
    fit_gates(run, "digits", FIT, check_source=False)
    assert read_meta(run).source_eval.top1 < 0.2


@pytest.mark.integration
@pytest.mark.source_check
def test_the_right_config_passes_and_every_report_compares_with_the_source(tmp_path, digits_r18):
    run = tmp_path / "run"
    attach(digits_r18, run_dir=run, **TRAINED)
    fit_gates(run, "digits", FIT)
    src = read_meta(run).source_eval
    assert src is not None and src.samples == 359 and src.data == "scikit-learn digits" and src.top1 > 0.5
    # the source's top-1 is the dense model's before any training: what a fresh attach of it scores with open gates
    fresh = tmp_path / "fresh"
    attach(digits_r18, run_dir=fresh, **TRAINED)
    open_rep = evaluate_run(fresh, "digits", gates="open", workers=0)
    assert open_rep.source_top1 == pytest.approx(open_rep.top1) == pytest.approx(src.top1)
    assert read_meta(fresh).source_eval.top1 == pytest.approx(src.top1)          # evaluate records it too
    finetune(run, "digits", FinetuneConfig(epochs=1, batch_size=64, workers=0))
    assert read_meta(run).source_eval == src                                       # measured once
    ev = evaluate_run(run, "digits", workers=0)
    assert ev.source_top1 == pytest.approx(src.top1)
    from ftwt_cli.eval.report import report_markdown, write_report
    md = report_markdown(ev)
    assert "source checkpoint" in md and f"against the source checkpoint ({src.top1:.2%})" in md
    assert "this run, gates open" in md
    write_report(ev, run)
    assert json.loads((run / "report.json").read_text())["source_top1"] == pytest.approx(src.top1)
    res = runner.invoke(app, ["evaluate", "--run", str(run), "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert "against the source checkpoint" in res.stdout and "source checkpoint" in res.stdout
    # the exported file carries it, and info shows it
    out = tmp_path / "exp" / "m.safetensors"
    runner.invoke(app, ["export", "--run", str(run), "--out", str(out)])
    assert ftwt_cli.load(out).meta.source_eval == src
    res = runner.invoke(app, ["info", str(out)])
    assert res.exit_code == 0 and "source checkpoint" in res.stdout and "against the source" in " ".join(res.stdout.split())


@pytest.mark.integration      # trains for tens of seconds on a 2-core CPU without AVX-512
def test_finetune_and_evaluate_take_the_runs_data(tmp_path, run):
    """`ftwt finetune` without --data trains on what the run was fitted on (the run records it)."""
    fit_gates(run, "digits", FIT)
    res = runner.invoke(app, ["finetune", "--run", str(run), "--epochs", "1", "--workers", "0", "--batch-size", "64"])
    assert res.exit_code == 0, res.output
    assert read_meta(run).training["finetune"].data == "digits"
    res = runner.invoke(app, ["finetune", "--run", str(tmp_path / "none"), "--epochs", "1"])
    assert res.exit_code == 2


def test_fresh_run_without_data_names_the_fix(tmp_path, run):
    res = runner.invoke(app, ["finetune", "--run", str(run), "--epochs", "1"])
    assert res.exit_code == 2 and "never trained" in res.stderr and "--data" in res.stderr


def test_export_embeds_the_deployed_report_not_an_oracle_one(tmp_path, fitted):
    """`evaluate --gates oracle` writes the run's report; the exported file still describes the predicted gates."""
    run = tmp_path / "run"
    shutil.copytree(fitted, run)                          # gates fitted as FIT fits them (conftest)
    res = runner.invoke(app, ["evaluate", "--run", str(run), "--gates", "oracle", "--r", "0.5", "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "report.json").read_text())["gates"] == "oracle"
    out = tmp_path / "exp" / "m.safetensors"
    assert runner.invoke(app, ["export", "--run", str(run), "--out", str(out)]).exit_code == 0
    e = ftwt_cli.load(out).meta.evaluation
    assert e.get("gates") != "oracle" and e["phase"] == "fit-gates"         # the last validation of the fitted gates
    assert "oracle" not in (out.parent / "report.md").read_text()


def test_preprocess_applies_the_runs_evaluation_transform(run):
    from PIL import Image

    from ftwt_cli.data import build_transform
    model = ftwt_cli.load(run)
    img = Image.fromarray((torch.arange(64).reshape(8, 8) * 4).to(torch.uint8).numpy(), mode="L")
    x = ftwt_cli.preprocess(model, img)
    want = build_transform(model.meta.data_config, train=False, small=True)(img.convert("RGB"))
    assert x.shape == (1, 3, 16, 16) and torch.equal(x[0], want)
    assert ftwt_cli.preprocess(model, [img, img]).shape == (2, 3, 16, 16)
    assert torch.equal(ftwt_cli.preprocess(model, torch.from_numpy(__import__("numpy").asarray(img.convert("RGB")).copy()).permute(2, 0, 1)), x)
    with pytest.raises(FtwtError, match="cannot read"):
        ftwt_cli.preprocess(model, object())
