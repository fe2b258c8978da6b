"""Never lose a user's files, never report success for what did not happen, never run another model than the
checkpoint's: --force limits, input inside the target, one commit per epoch under crashes, one writer at a time,
crash leftovers, umask, resume settings, and one-line errors for bad input."""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import StopAfter
from PIL import Image
from typer.testing import CliRunner

import ftwt_cli
from ftwt_cli.attach import attach
from ftwt_cli.cli import app
from ftwt_cli.data import make_loader, open_data
from ftwt_cli.errors import FtwtError
from ftwt_cli.io import read_meta, run_lock
from ftwt_cli.train import FitGatesConfig, fit_gates

runner = CliRunner()
FIT = dict(r=0.9, epochs=2, lr=0.05, batch_size=64, workers=0)


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(res, expect):
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], res.stderr
    assert "Traceback" not in res.output


# ------------------------------------------------------------------------------------------- data loss
def test_force_never_replaces_a_folder_ftwt_did_not_write(tmp_path, ckpt):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = _tree(mine)
    _one_line_error(runner.invoke(app, ["attach", str(ckpt), "--run", str(mine), "--force", "--input-size", "3,16,16"]),
                    "is not an ftwt run")
    _one_line_error(runner.invoke(app, ["demo", "--dir", str(mine), "--force", "--data", "digits"]), "not made by `ftwt demo`")
    assert _tree(mine) == before


def test_force_refuses_an_input_inside_the_run_and_the_current_folder(run, monkeypatch):
    inner = run / "export" / "backbone.pth"
    inner.parent.mkdir()
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), inner)
    before = _tree(run)
    _one_line_error(runner.invoke(app, ["attach", str(inner), "--run", str(run), "--force", "--input-size", "3,16,16"]),
                    "lies inside the run")
    monkeypatch.chdir(run)
    _one_line_error(runner.invoke(app, ["attach", str(inner), "--run", ".", "--force"]), "is the current folder")
    assert _tree(run) == before


def test_export_keeps_report_files_and_never_the_runs_own_report(run, tmp_path):
    (run / "report.json").write_text('{"the run\'s": "evaluation"}')
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("someone's notes")
    _one_line_error(runner.invoke(app, ["export", "--run", str(run), "--out", str(out / "m.safetensors")]), "report.md already exist")
    _one_line_error(runner.invoke(app, ["export", "--run", str(run), "--out", str(run / "m.safetensors"), "--force"]),
                    "run's own evaluation report")
    assert (out / "report.md").read_text() == "someone's notes" and not (out / "m.safetensors").exists()
    assert json.loads((run / "report.json").read_text()) == {"the run's": "evaluation"}
    res = runner.invoke(app, ["export", "--run", str(run), "--out", str(out / "m.safetensors"), "--force"])
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------------------------------- crashes
_CHILD = textwrap.dedent("""
    import os, sys
    kill_at, before = int(sys.argv[1]), sys.argv[2] == "before"
    real, calls = os.replace, [0]
    def replace(src, dst):
        calls[0] += 1
        if calls[0] == kill_at and before:
            os._exit(9)                      # killed with the new file written but not moved into place
        real(src, dst)
        if calls[0] == kill_at:
            os._exit(9)                      # killed right after this write
    os.replace = replace
    from ftwt_cli.train import FitGatesConfig, fit_gates
    fit_gates(sys.argv[3], "digits", FitGatesConfig(r=0.9, epochs=2, lr=0.05, batch_size=64, workers=0), train_samples=128,
              check_source=False)          # a random-init model: at chance by construction
""")


@pytest.mark.integration
def test_a_crash_at_any_write_leaves_the_last_complete_epoch(run, tmp_path):
    """Kill a fit-gates child at each of its writes (before and after the move into place): the run then loads,
    its metadata, weights and checkpoint belong together, and --resume ends where an uninterrupted run ends."""
    ref = tmp_path / "ref"
    subprocess.run(["cp", "-r", str(run), str(ref)], check=True)
    fit_gates(ref, "digits", FitGatesConfig(**FIT), train_samples=128)
    want = ftwt_cli.load(ref).state_dict()
    # writes: the writability check, then per epoch weights, checkpoint, ftwt.json (the commit), metrics.jsonl
    for kill_at, when in [(1, "after"), (2, "before"), (2, "after"), (3, "after"), (4, "before"), (4, "after"),
                          (5, "before"), (8, "before")]:
        r = tmp_path / f"crash-{kill_at}-{when}"
        subprocess.run(["cp", "-r", str(run), str(r)], check=True)
        p = subprocess.run([sys.executable, "-c", _CHILD, str(kill_at), when, str(r)], capture_output=True, text=True)
        assert p.returncode == 9, p.stderr
        meta = read_meta(r)
        epochs = len(meta.training["fit-gates"].epochs) if "fit-gates" in meta.training else 0
        assert (meta.gating.mode == "predict") == (epochs > 0)           # fitted gates are never labelled open
        if epochs:
            ck = torch.load(r / meta.files.checkpoint, weights_only=True)
            assert ck["epoch"] == epochs
        ftwt_cli.load(r)
        rep = fit_gates(r, "digits", resume=epochs > 0, cfg=None if epochs else FitGatesConfig(**FIT), train_samples=128)
        assert [e.epoch for e in rep.epochs] == [1, 2]
        got = ftwt_cli.load(r).state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), (kill_at, when)
        files = read_meta(r).files
        assert {p.name for p in r.iterdir()} == {"ftwt.json", "metrics.jsonl", files.weights, files.checkpoint}  # cleaned
        log = [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()]
        assert [(e["phase"], e["epoch"]) for e in log] == [("fit-gates", 1), ("fit-gates", 2)]


def test_one_writer_at_a_time_and_a_dead_holder_does_not_block(run):
    with run_lock(run, "ftwt fit-gates"):
        _one_line_error(runner.invoke(app, ["fit-gates", "--data", "digits", "--run", str(run), "--workers", "0"]),
                        "being written by another ftwt command (ftwt fit-gates, pid")
    child = "import os, sys; from ftwt_cli.io import run_lock; l = run_lock(sys.argv[1]); l.__enter__(); os._exit(9)"
    assert subprocess.run([sys.executable, "-c", child, str(run)]).returncode == 9
    with run_lock(run):           # the dead process's lock is gone with it
        pass
    assert {p.name for p in run.iterdir()} == {"ftwt.json", "weights.safetensors"}


def test_leftovers_are_cleaned_and_user_files_kept(run, tmp_path):
    (run / ".weights.safetensors.x1.tmp").write_bytes(b"partial")
    (run / "weights.fit-gates-e9.safetensors").write_bytes(b"an unfinished commit")
    (run / "notes.txt").write_text("mine")
    old = tmp_path / f".{run.name}.abc123.old"
    old.mkdir()
    (old / "ftwt.json").write_text(json.dumps({"format": "ftwt-run"}))
    with run_lock(run):
        pass
    assert {p.name for p in run.iterdir()} == {"ftwt.json", "weights.safetensors", "notes.txt"}
    assert not old.exists()


@pytest.mark.integration
def test_evaluate_without_ood_drops_an_old_ood_plot(run):
    fit_gates(run, "digits", FitGatesConfig(**{**FIT, "epochs": 1}), train_samples=128)
    args = ["evaluate", "--run", str(run), "--data", "digits", "--workers", "0"]
    assert runner.invoke(app, [*args, "--corruption", "jpeg", "--ood-samples", "16"]).exit_code == 0
    assert (run / "ood.png").is_file()
    assert runner.invoke(app, args).exit_code == 0
    assert not (run / "ood.png").exists() and (run / "report.md").is_file()


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_files_follow_the_umask(tmp_path, ckpt, mask):
    old = os.umask(mask)
    try:
        attach(ckpt, arch="torchvision:resnet18", input_size=(3, 16, 16), run_dir=tmp_path / "run")
    finally:
        os.umask(old)
    for p in (tmp_path / "run").iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o777 & ~mask


# ------------------------------------------------------------------------------------------- resume
def test_resume_keeps_the_runs_settings_and_refuses_conflicting_flags(run):
    with pytest.raises(KeyboardInterrupt):
        fit_gates(run, "digits", FitGatesConfig(**FIT), train_samples=128, progress=StopAfter(1))
    before = _tree(run)
    _one_line_error(runner.invoke(app, ["fit-gates", "--data", "digits", "--run", str(run), "--resume", "--lr", "0.5",
                                        "--train-samples", "128"]), "lr=0.5 conflicts with the interrupted run's lr=0.05")
    _one_line_error(runner.invoke(app, ["fit-gates", "--data", "digits", "--run", str(run), "--resume", "--epochs", "5"]),
                    "epochs=5 conflicts")
    assert _tree(run) == before
    res = runner.invoke(app, ["fit-gates", "--data", "digits", "--run", str(run), "--resume", "--lr", "0.05",
                              "--train-samples", "128"])
    assert res.exit_code == 0, res.output
    assert len(read_meta(run).training["fit-gates"].epochs) == 2


# ------------------------------------------------------------------------------------------- the checkpoint's model
def test_non_finite_and_integer_weights_are_refused(tmp_path):
    sd = torchvision.models.resnet18(num_classes=10).state_dict()
    bad = dict(sd, **{"layer1.0.conv1.weight": sd["layer1.0.conv1.weight"].clone().index_fill_(0, torch.tensor([0]), float("nan"))})
    torch.save(bad, tmp_path / "nan.pth")
    _one_line_error(runner.invoke(app, ["attach", str(tmp_path / "nan.pth"), "--run", str(tmp_path / "a"), "--arch", "resnet18"]),
                    "tensor layer1.0.conv1.weight holds NaN or infinite values")
    ints = dict(sd, **{"fc.weight": sd["fc.weight"].round().long()})
    torch.save(ints, tmp_path / "int.pth")
    _one_line_error(runner.invoke(app, ["attach", str(tmp_path / "int.pth"), "--run", str(tmp_path / "b"),
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


# ------------------------------------------------------------------------------------------- one line, not a traceback
def test_a_full_disk_fails_before_training_with_one_line(run, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("ftwt_cli.io.rundir.os.replace", full)
    before = _tree(run)
    _one_line_error(runner.invoke(app, ["fit-gates", "--data", "digits", "--run", str(run), "--workers", "0"]), "the disk is full")
    assert _tree(run) == before


@pytest.mark.parametrize("args,expect", [
    (["evaluate", "--batch-size", "0", "--data", "digits"], "Invalid value for '--batch-size'"),
    (["evaluate", "--batch-size", "-3", "--data", "digits"], "Invalid value for '--batch-size'"),
    (["fit-gates", "--data", "digits", "--r", "abc"], "Invalid value for '--r'"),
    (["fit-gates", "--data", "digits", "--gt", "best"], "'best' is not one of 'mass', 'uniform'"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_usage_errors_are_one_line(run, args, expect):
    _one_line_error(runner.invoke(app, [*args, "--run", str(run)] if args[0] != "frobnicate" else args), expect)


@pytest.mark.parametrize("recipe,expect", [
    ("finetune:\n  step_epochs: \"1\"\n", "step_epochs='1' must be a list of integers"),
    ("finetune:\n  momentum: -3\n", "momentum=-3.0 is negative"),
    ("finetune:\n  schedule: 7\n", "schedule=7 must be a string"),
])
def test_mistyped_recipes_are_one_line(run, tmp_path, recipe, expect):
    (tmp_path / "r.yaml").write_text(recipe)
    _one_line_error(runner.invoke(app, ["finetune", "--data", "digits", "--run", str(run), "--recipe", str(tmp_path / "r.yaml")]),
                    expect)


def test_binary_recipe_and_damaged_metadata_are_one_line(run, tmp_path):
    (tmp_path / "r.yaml").write_bytes(bytes(range(256)))
    _one_line_error(runner.invoke(app, ["fit-gates", "--data", "digits", "--run", str(run), "--recipe", str(tmp_path / "r.yaml")]),
                    "r.yaml")
    (run / "ftwt.json").write_text("[1, 2]")
    _one_line_error(runner.invoke(app, ["info", str(run)]), "does not hold a JSON object")
    d = {"format": "ftwt-run", "format_version": 1}
    (run / "ftwt.json").write_text(json.dumps(d))
    _one_line_error(runner.invoke(app, ["info", str(run)]), "arch is not a mapping")


def test_ctrl_c_while_starting_is_one_line(monkeypatch, capsys):
    import ftwt_cli.cli as cli

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_app", interrupted)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted while starting; nothing was written"


def test_resume_through_the_library_names_the_conflict(run):
    with pytest.raises(KeyboardInterrupt):
        fit_gates(run, "digits", FitGatesConfig(**FIT), train_samples=128, progress=StopAfter(1))
    with pytest.raises(FtwtError, match="seed=3 conflicts with the interrupted run's seed=0. Fix: drop it"):
        fit_gates(run, "digits", FitGatesConfig(**{**FIT, "seed": 3}), resume=True, train_samples=128)


def test_flags_are_checked_before_torch_is_imported():
    """The command line (every command registered) imports nothing heavy: a bad choice fails at once."""
    code = "import sys, ftwt_cli.cli as c; c._app(); print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision')))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-m", "ftwt_cli", "fit-gates", "--gt", "best", "--data", "x"], capture_output=True, text=True)
    assert p.returncode == 2 and "'best' is not one of 'mass', 'uniform'" in p.stderr
