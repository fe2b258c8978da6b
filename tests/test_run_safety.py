"""A run directory never loses a user's files and never reports what did not happen: --force limits, an input
inside the target, one commit per epoch under crashes, one writer at a time, crash leftovers, the umask."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from helpers import one_line_error, tree
from typer.testing import CliRunner

import ftwt_cli
from ftwt_cli.attach import attach
from ftwt_cli.cli import app
from ftwt_cli.formats import read_meta, run_lock
from ftwt_cli.train import FitGatesConfig, fit_gates

runner = CliRunner()
FIT = dict(r=0.9, epochs=2, lr=0.05, batch_size=64, workers=0)


def test_force_never_replaces_a_folder_ftwt_did_not_write(tmp_path, ckpt):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = tree(mine)
    one_line_error(runner.invoke(app, ["attach", str(ckpt), "--run", str(mine), "--force", "--input-size", "3,16,16"]),
                    "is not an ftwt run")
    one_line_error(runner.invoke(app, ["demo", "--dir", str(mine), "--force", "--data", "digits"]), "not made by `ftwt demo`")
    assert tree(mine) == before


def test_force_refuses_an_input_inside_the_run_and_the_current_folder(run, monkeypatch):
    inner = run / "export" / "backbone.pth"
    inner.parent.mkdir()
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), inner)
    before = tree(run)
    one_line_error(runner.invoke(app, ["attach", str(inner), "--run", str(run), "--force", "--input-size", "3,16,16"]),
                    "lies inside the run")
    monkeypatch.chdir(run)
    one_line_error(runner.invoke(app, ["attach", str(inner), "--run", ".", "--force"]), "is the current folder")
    assert tree(run) == before


def test_export_keeps_report_files_and_never_the_runs_own_report(run, tmp_path):
    (run / "report.json").write_text('{"the run\'s": "evaluation"}')
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("someone's notes")
    one_line_error(runner.invoke(app, ["export", "--run", str(run), "--out", str(out / "m.safetensors")]), "report.md already exist")
    one_line_error(runner.invoke(app, ["export", "--run", str(run), "--out", str(run / "m.safetensors"), "--force"]),
                    "run's own evaluation report")
    assert (out / "report.md").read_text() == "someone's notes" and not (out / "m.safetensors").exists()
    assert json.loads((run / "report.json").read_text()) == {"the run's": "evaluation"}
    res = runner.invoke(app, ["export", "--run", str(run), "--out", str(out / "m.safetensors"), "--force"])
    assert res.exit_code == 0, res.output

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
        one_line_error(runner.invoke(app, ["fit-gates", "--data", "digits", "--run", str(run), "--workers", "0"]),
                        "being written by another ftwt command (ftwt fit-gates, pid")
    child = "import os, sys; from ftwt_cli.formats import run_lock; l = run_lock(sys.argv[1]); l.__enter__(); os._exit(9)"
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
