"""Bad input is one line (`error: … Fix: …`, exit 2), never a traceback: a full disk, usage errors, mistyped recipes,
damaged metadata, Ctrl-C while starting; flags are checked before torch is imported."""
import json
import subprocess
import sys

import pytest
from helpers import one_line_error, tree
from typer.testing import CliRunner

from ftwt_cli.cli import app

runner = CliRunner()
FIT = dict(r=0.9, epochs=2, lr=0.05, batch_size=64, workers=0)


def test_a_full_disk_fails_before_training_with_one_line(run, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("ftwt_cli.formats.rundir.os.replace", full)
    before = tree(run)
    one_line_error(runner.invoke(app, ["fit-gates", "--data", "digits", "--run", str(run), "--workers", "0"]), "the disk is full")
    assert tree(run) == before


@pytest.mark.parametrize("args,expect", [
    (["evaluate", "--batch-size", "0", "--data", "digits"], "Invalid value for '--batch-size'"),
    (["evaluate", "--batch-size", "-3", "--data", "digits"], "Invalid value for '--batch-size'"),
    (["fit-gates", "--data", "digits", "--r", "abc"], "Invalid value for '--r'"),
    (["fit-gates", "--data", "digits", "--gt", "best"], "'best' is not one of 'mass', 'uniform'"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_usage_errors_are_one_line(run, args, expect):
    one_line_error(runner.invoke(app, [*args, "--run", str(run)] if args[0] != "frobnicate" else args), expect)


@pytest.mark.parametrize("recipe,expect", [
    ("finetune:\n  step_epochs: \"1\"\n", "step_epochs='1' must be a list of integers"),
    ("finetune:\n  momentum: -3\n", "momentum=-3.0 is negative"),
    ("finetune:\n  schedule: 7\n", "schedule=7 must be a string"),
])
def test_mistyped_recipes_are_one_line(run, tmp_path, recipe, expect):
    (tmp_path / "r.yaml").write_text(recipe)
    one_line_error(runner.invoke(app, ["finetune", "--data", "digits", "--run", str(run), "--recipe", str(tmp_path / "r.yaml")]),
                    expect)


def test_binary_recipe_and_damaged_metadata_are_one_line(run, tmp_path):
    (tmp_path / "r.yaml").write_bytes(bytes(range(256)))
    one_line_error(runner.invoke(app, ["fit-gates", "--data", "digits", "--run", str(run), "--recipe", str(tmp_path / "r.yaml")]),
                    "r.yaml")
    (run / "ftwt.json").write_text("[1, 2]")
    one_line_error(runner.invoke(app, ["info", str(run)]), "does not hold a JSON object")
    d = {"format": "ftwt-run", "format_version": 1}
    (run / "ftwt.json").write_text(json.dumps(d))
    one_line_error(runner.invoke(app, ["info", str(run)]), "arch is not a mapping")


def test_ctrl_c_while_starting_is_one_line(monkeypatch, capsys):
    import ftwt_cli.cli as cli

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_app", interrupted)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted while starting; nothing was written"


def test_flags_are_checked_before_torch_is_imported():
    """The command line (every command registered) imports nothing heavy: a bad choice fails at once."""
    code = "import sys, ftwt_cli.cli as c; c._app(); print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision')))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-m", "ftwt_cli", "fit-gates", "--gt", "best", "--data", "x"], capture_output=True, text=True)
    assert p.returncode == 2 and "'best' is not one of 'mass', 'uniform'" in p.stderr
