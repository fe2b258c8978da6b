"""--resume continues a run with its own settings and refuses flags that conflict with them."""

import pytest
from helpers import StopAfter, one_line_error, tree
from typer.testing import CliRunner

from ftwt_cli.cli import app
from ftwt_cli.errors import FtwtError
from ftwt_cli.formats import read_meta
from ftwt_cli.train import FitGatesConfig, fit_gates

runner = CliRunner()
FIT = dict(r=0.9, epochs=2, lr=0.05, batch_size=64, workers=0)


def test_resume_keeps_the_runs_settings_and_refuses_conflicting_flags(run):
    with pytest.raises(KeyboardInterrupt):
        fit_gates(run, "digits", FitGatesConfig(**FIT), train_samples=128, progress=StopAfter(1))
    before = tree(run)
    one_line_error(runner.invoke(app, ["fit-gates", "--data", "digits", "--run", str(run), "--resume", "--lr", "0.5",
                                        "--train-samples", "128"]), "lr=0.5 conflicts with the interrupted run's lr=0.05")
    one_line_error(runner.invoke(app, ["fit-gates", "--data", "digits", "--run", str(run), "--resume", "--epochs", "5"]),
                    "epochs=5 conflicts")
    assert tree(run) == before
    res = runner.invoke(app, ["fit-gates", "--data", "digits", "--run", str(run), "--resume", "--lr", "0.05",
                              "--train-samples", "128"])
    assert res.exit_code == 0, res.output
    assert len(read_meta(run).training["fit-gates"].epochs) == 2


def test_resume_through_the_library_names_the_conflict(run):
    with pytest.raises(KeyboardInterrupt):
        fit_gates(run, "digits", FitGatesConfig(**FIT), train_samples=128, progress=StopAfter(1))
    with pytest.raises(FtwtError, match="seed=3 conflicts with the interrupted run's seed=0. Fix: drop it"):
        fit_gates(run, "digits", FitGatesConfig(**{**FIT, "seed": 3}), resume=True, train_samples=128)
