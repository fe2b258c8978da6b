"""A user's own checkpoint and data taken at their word: a timm train.py checkpoint with its args, a 28-px
ImageFolder, class names and order, and what the CLI shows and records."""
import argparse
import json
import re

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

import ftwt_cli
from ftwt_cli.attach import attach
from ftwt_cli.cli import app
from ftwt_cli.data import open_data
from ftwt_cli.errors import FtwtError
from ftwt_cli.formats import read_meta
from ftwt_cli.train import FitGatesConfig, fit_gates

runner = CliRunner()


def _folder(root, classes, size=28, n=6):
    """An ImageFolder of ``size``-px grayscale PNGs whose class is readable from the brightness."""
    g = np.random.default_rng(0)
    for split in ("train", "val"):
        for i, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                a = np.clip(g.normal(40 + 170 * i / max(len(classes) - 1, 1), 20, (size, size)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{k}.png")
    return root


@pytest.fixture
def timm_ckpt(tmp_path):
    """What timm's CheckpointSaver writes for a 1-channel, 32-px ResNet-18 trained on 3 classes."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=3, in_chans=1)
    args = argparse.Namespace(model="resnet18", input_size=[1, 32, 32], img_size=None, mean=[0.5], std=[0.25],
                              interpolation="bilinear", crop_pct=1.0, lr=0.1, epochs=10)
    p = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 9, "arch": "resnet18", "state_dict": model.state_dict(), "optimizer": {}, "version": 2,
                "args": args, "metric": 71.5}, p)
    return p


def test_a_timm_train_checkpoint_with_its_input_config(timm_ckpt, tmp_path):
    rep = attach(timm_ckpt, run_dir=tmp_path / "run")
    assert rep.arch == "timm:resnet18" and rep.source_format == "timm-train"     # the file's own arch, not torchvision's
    dc = read_meta(tmp_path / "run").data_config
    assert tuple(dc.input_size) == (1, 32, 32) and dc.mean == (0.5,) and dc.std == (0.25,) and dc.crop_pct == 1.0
    # flags override what the checkpoint says
    rep = attach(timm_ckpt, run_dir=tmp_path / "run2", input_size=(1, 48, 48), interpolation="bicubic", crop_pct=0.9,
                 augment="small")
    dc = read_meta(tmp_path / "run2").data_config
    assert tuple(dc.input_size) == (1, 48, 48) and dc.interpolation == "bicubic" and dc.crop_pct == 0.9
    assert dc.augment == "small" and dc.mean == (0.5,)


def test_small_image_folders_take_the_small_image_path_and_a_size_note(tmp_path, timm_ckpt):
    data = _folder(tmp_path / "data", ["a", "b", "c"])
    from ftwt_cli.arch import DataConfig
    cfg = DataConfig((1, 32, 32), (0.5,), (0.25,), "bilinear", 1.0, "center")
    s = open_data(str(data), cfg, num_classes=3)
    assert s.small and s.native_size == (28, 28)
    big = DataConfig((1, 224, 224), (0.5,), (0.25,), "bilinear", 0.875, "center")
    assert not open_data(str(data), big.updated({"augment": "imagenet"}, "the flags"), num_classes=3).small
    attach(timm_ckpt, run_dir=tmp_path / "run", input_size=(1, 224, 224))
    res = runner.invoke(app, ["fit-gates", "--data", str(data), "--run", str(tmp_path / "run"), "--epochs", "1",
                              "--batch-size", "6", "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert res.stdout.count("holds 28×28 images but the model's input size is 224×224") == 1


def test_class_names_are_recorded_checked_and_exported(tmp_path, timm_ckpt):
    data = _folder(tmp_path / "data", ["cat", "dog", "emu"])
    other = _folder(tmp_path / "other", ["ant", "cat", "dog"])
    run = tmp_path / "run"
    attach(timm_ckpt, run_dir=run)
    fit_gates(run, str(data), FitGatesConfig(epochs=1, batch_size=6, workers=0))
    assert read_meta(run).classes == ["cat", "dog", "emu"]
    before = (run / "ftwt.json").read_text()
    res = runner.invoke(app, ["fit-gates", "--data", str(other), "--run", str(run), "--workers", "0"])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "label 0 is 'ant' there but 'cat' in the run" in res.stderr
    assert (run / "ftwt.json").read_text() == before
    with pytest.raises(FtwtError, match="other classes than the run"):
        from ftwt_cli.eval import evaluate_run
        evaluate_run(run, str(other), gates="open", workers=0)
    out = tmp_path / "exp" / "m.safetensors"
    assert runner.invoke(app, ["export", "--run", str(run), "--out", str(out)]).exit_code == 0
    m = ftwt_cli.load(out)
    assert m.meta.classes == ["cat", "dog", "emu"] and m.meta.environment["torch"] == torch.__version__


@pytest.mark.integration
def test_cli_shows_defaults_versions_logs_and_json(tmp_path, timm_ckpt):
    res = runner.invoke(app, ["fit-gates", "-h"])
    flat = re.sub(r"[\s│]+", " ", res.stdout).replace("(", "").replace(")", "")      # however rich wraps the table
    assert res.exit_code == 0 and "[default: 0.95]" in flat
    assert "mass|uniform" in res.stdout
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"ftwt {ftwt_cli.__version__}"
    data = _folder(tmp_path / "data", ["a", "b", "c"])
    run = tmp_path / "run"
    attach(timm_ckpt, run_dir=run)
    (tmp_path / "r.yaml").write_text(f"data: {data}\nfit_gates:\n  epochs: 1\n  batch_size: 6\n"
                                     "finetune:\n  epochs: 2\n  batch_size: 6\n  schedule: step\n")
    assert runner.invoke(app, ["fit-gates", "--recipe", str(tmp_path / "r.yaml"), "--run", str(run), "--workers", "0"]).exit_code == 0
    res = runner.invoke(app, ["finetune", "--recipe", str(tmp_path / "r.yaml"), "--run", str(run), "--workers", "0",
                              "--step-epochs", "1", "--gamma", "0.5"])
    assert res.exit_code == 0, res.output
    cfg = read_meta(run).training["finetune"].config
    assert cfg["step_epochs"] == [1] and cfg["gamma"] == 0.5 and cfg["schedule"] == "step"
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(e["phase"], e["epoch"]) for e in log] == [("fit-gates", 1), ("finetune", 1), ("finetune", 2)]
    info = json.loads(runner.invoke(app, ["info", str(run), "--json"]).stdout)
    assert info["arch"]["name"] == "resnet18" and info["environment"]["timm"] == timm.__version__
    assert info["classes"] == ["a", "b", "c"]
    (tmp_path / "bad.yaml").write_text("model: resnet18\n")
    res = runner.invoke(app, ["fit-gates", "--recipe", str(tmp_path / "bad.yaml"), "--run", str(run)])
    assert res.exit_code == 2 and "unknown key 'model'" in res.stderr
    attach(timm_ckpt, run_dir=tmp_path / "fresh")           # a trained run's commands default to its data; not a fresh one
    res = runner.invoke(app, ["fit-gates", "--run", str(tmp_path / "fresh")])
    assert res.exit_code == 2 and "no --data given" in res.stderr


def test_bench_json(r18_run):
    res = runner.invoke(app, ["bench", "--run", str(r18_run), "--r", "0.9", "--reps", "2", "--warmup", "1", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert [r["variant"] for r in d["rows"]] == ["dense", "dense-folded", "masked", "compact"] and d["macs_ratio"] < 1


def test_one_value_mean_and_std_are_every_channels(tmp_path):
    """timm's train.py takes `--mean 0.5` for a 3-channel model (it expands it); so does attach, from the checkpoint
    or from the flags, and a flag overrides the checkpoint's value without reading it."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=3)
    args = argparse.Namespace(model="resnet18", input_size=[3, 32, 32], mean=[0.5], std=[0.25], crop_pct=1.0)
    p = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": model.state_dict(), "args": args}, p)
    attach(p, run_dir=tmp_path / "a")
    dc = read_meta(tmp_path / "a").data_config
    assert dc.mean == (0.5,) * 3 and dc.std == (0.25,) * 3
    attach(p, run_dir=tmp_path / "b", mean=(0.4, 0.45, 0.5))
    assert read_meta(tmp_path / "b").data_config.mean == (0.4, 0.45, 0.5)
    res = runner.invoke(app, ["attach", str(p), "--run", str(tmp_path / "c"), "--mean", "0.3", "--std", "0.2"])
    assert res.exit_code == 0, res.output
    assert read_meta(tmp_path / "c").data_config.mean == (0.3,) * 3


@pytest.mark.parametrize("args,size,crop", [
    (dict(train_crop_size=32, val_crop_size=32, val_resize_size=32), 32, 1.0),     # a small-image run, all stated
    (dict(train_crop_size=32, val_crop_size=224, val_resize_size=256), 32, 1.0),   # only the training size changed
    (dict(train_crop_size=176, val_crop_size=224, val_resize_size=232), 224, round(224 / 232, 4)),   # the v2 recipe
])
def test_torchvision_reference_script_checkpoints(tmp_path, args, size, crop):
    """torchvision's references/classification/train.py saves {"model", "args", ...}: its crop and resize sizes and
    its model name are read."""
    import torchvision
    torch.manual_seed(0)
    ns = argparse.Namespace(model="resnet18", interpolation="bilinear", lr=0.5, **args)
    p = tmp_path / "checkpoint.pth"
    torch.save({"model": torchvision.models.resnet18(num_classes=10).state_dict(), "optimizer": {}, "epoch": 3,
                "args": ns}, p)
    rep = attach(p, run_dir=tmp_path / "run")
    assert rep.arch == "torchvision:resnet18" and rep.input_source == "as the checkpoint states"
    dc = read_meta(tmp_path / "run").data_config
    assert tuple(dc.input_size) == (3, size, size) and dc.crop_pct == pytest.approx(crop)


@pytest.mark.parametrize("build,name,expect,note", [
    (lambda: __import__("torchvision").models.resnet34(num_classes=10), "resnet34.pth", "torchvision:resnet34",
     "timm:resnet34 computes the same function but expects other preprocessing"),
    pytest.param(lambda: __import__("torchvision").models.resnet50(num_classes=10), "resnet50.pth",
                 "torchvision:resnet50",
                 "the weights also fit timm:resnetaa50, timm:resnetblur50, which compute another function",
                 marks=pytest.mark.integration),                                                   # 7 s
    (lambda: timm.create_model("mixnet_s", num_classes=10), "mixnet_s.pth", "timm:mixnet_s",
     "the weights also fit timm:tf_mixnet_s, which compute another function; pass --arch timm:tf_mixnet_s"),
])
def test_plain_state_dicts_attach_without_arch_and_say_what_was_chosen(tmp_path, build, name, expect, note):
    """`ftwt attach resnet34.pth` on the file most people have: no flag needed, the choice and its alternatives said."""
    torch.manual_seed(0)
    torch.save(build().state_dict(), tmp_path / name)
    res = runner.invoke(app, ["attach", str(tmp_path / name), "--run", str(tmp_path / "run"), "--input-size", "3,32,32"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.stdout.split())
    assert f"model: {expect}" in out and f"note: chose {expect}" in out and note in out
    assert "(an MLP unit" not in out                                  # a CNN has no MLP units to explain
    assert read_meta(tmp_path / "run").arch.name == expect.split(":")[1]
