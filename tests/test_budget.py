"""--target-cut: the r whose oracle masks cut a share of the MACs, found by bisection on calibration images."""
import pytest
from typer.testing import CliRunner

import ftwt_cli
from ftwt_cli.cli import app
from ftwt_cli.data import open_data
from ftwt_cli.errors import FtwtError
from ftwt_cli.eval import evaluate_loader, evaluate_run
from ftwt_cli.eval.budget import calibration_batches, find_r
from ftwt_cli.formats import read_meta
from ftwt_cli.train.config import FitGatesConfig
from ftwt_cli.train.loops import fit_gates

runner = CliRunner()


def _calib(model, n=128):
    splits = open_data("digits", model.meta.data_config, num_classes=10)
    return calibration_batches(splits.calibration(model.meta.data_config, n), 128, 0)


def test_the_r_found_cuts_the_target_on_the_calibration_images(r18_run):
    model = ftwt_cli.load(r18_run)
    batches = _calib(model)
    choice = find_r(model, batches, 0.5)
    assert abs(choice.cut - 0.5) <= 0.0025 and 0 < choice.r <= 1
    assert choice.reachable[0] < 0.5 < choice.reachable[1] and choice.samples == 128
    # the same r through the ordinary oracle evaluation gives the same cut; the model's mode is left as it was
    assert model.mode == "open"
    model.set_gates("oracle", r=choice.r)
    assert evaluate_loader(model, batches).reduction == pytest.approx(choice.cut)
    # a larger target needs a smaller r
    assert find_r(model, batches, 0.7, tol=0.01).r < choice.r


def test_an_unreachable_target_names_the_reachable_range(r18_run):
    model = ftwt_cli.load(r18_run)
    with pytest.raises(FtwtError, match=r"cannot be reached.*r = 1.*r → 0") as e:
        find_r(model, _calib(model, 64), 0.999)
    assert "between" in e.value.hint
    with pytest.raises(FtwtError, match="outside"):
        find_r(model, _calib(model, 64), 1.5)


def test_fit_gates_with_a_target_cut_stores_the_r_it_found(run):
    rep = fit_gates(run, "digits", FitGatesConfig(target_cut=0.5, calib_samples=64, epochs=1, batch_size=128, workers=0))
    cfg = read_meta(run).training["fit-gates"].config
    assert cfg["target_cut"] == 0.5 and cfg["r"] == rep.config["r"] == read_meta(run).gating.r != 0.95
    oracle = evaluate_run(run, "digits", gates="oracle", target_cut=0.5, calib_samples=64, device="cpu")
    assert oracle.r == pytest.approx(cfg["r"]) and any("target cut 50.0%" in n for n in oracle.notes)


def test_cli_refuses_r_with_target_cut_and_a_cut_outside_0_1(run):
    for args in (["fit-gates", "--data", "digits", "--r", "0.9", "--target-cut", "0.4"],
                 ["fit-gates", "--data", "digits", "--target-cut", "1.4"],
                 ["evaluate", "--data", "digits", "--gates", "predict", "--target-cut", "0.4"],
                 ["evaluate", "--data", "digits", "--gates", "oracle", "--target-cut", "0"]):
        res = runner.invoke(app, [*args, "--run", str(run)])
        assert res.exit_code == 2, res.output
        assert res.output.startswith("error: ") and "Fix:" in res.output and len(res.output.strip().splitlines()) == 1
