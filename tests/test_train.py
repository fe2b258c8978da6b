"""fit-gates and finetune on scikit-learn's digits with a small ResNet-18 (16 px): fast, real data."""
import hashlib
import shutil

import pytest
import torch
import torchvision
from helpers import StopAfter
from typer.testing import CliRunner

import ftwt_cli
from ftwt_cli.attach import attach
from ftwt_cli.cli import app
from ftwt_cli.errors import FtwtError
from ftwt_cli.formats import read_meta
from ftwt_cli.train.config import FinetuneConfig, FitGatesConfig
from ftwt_cli.train.loops import (
    distill_loss,
    finetune,
    fit_gates,
    gate_loss,
)

runner = CliRunner()
FIT = dict(r=0.9, epochs=2, lr=0.05, batch_size=64, workers=0)


def _gates(run):
    return {k: v.clone() for k, v in ftwt_cli.load(run).state_dict().items() if k.startswith("gates.")}


def _backbone(run):
    return {k: v.clone() for k, v in ftwt_cli.load(run).state_dict().items() if k.startswith("backbone.")}


def test_fit_gates_learns_the_ground_truth_and_leaves_the_backbone(run):
    before = _backbone(run)
    rep = fit_gates(run, "digits", FitGatesConfig(**FIT))
    e1, e2 = rep.epochs
    assert e2.bce < e1.bce and e2.agreement > 0.8
    assert 0 < e2.keep_ratio < 1 and e2.macs_cut > 0.05
    after = _backbone(run)
    assert all(torch.equal(before[k], after[k]) for k in before)       # frozen backbone, BN stats included
    m = ftwt_cli.load(run)
    assert m.mode == "predict" and m.r == 0.9 and m.meta.last_eval.reduction == pytest.approx(rep.final.reduction)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        m(x)
    assert (m.last_stats.macs < m.last_stats.dense_macs).all()


@pytest.mark.integration      # trains for tens of seconds on a 2-core CPU without AVX-512
def test_fit_gates_is_deterministic_and_resume_is_exact(run, tmp_path):
    import shutil
    other = tmp_path / "other"
    shutil.copytree(run, other)
    third = tmp_path / "third"
    shutil.copytree(run, third)
    fit_gates(run, "digits", FitGatesConfig(**FIT))
    fit_gates(other, "digits", FitGatesConfig(**FIT))
    a, b = _gates(run), _gates(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(KeyboardInterrupt):
        fit_gates(third, "digits", FitGatesConfig(**FIT), progress=StopAfter(1))      # interrupted after epoch 1
    rep = fit_gates(third, "digits", resume=True)                                   # the run's own settings
    c = _gates(third)
    assert all(torch.equal(a[k], c[k]) for k in a) and [e.epoch for e in rep.epochs] == [1, 2]


def test_finetune_decoupled_keeps_task_loss_away_from_gates(fitted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fitted, run)                          # gates fitted one epoch at r = 0.9 (conftest)
    gates_before = _gates(run)
    rep = finetune(run, "digits", FinetuneConfig(epochs=1, lr=0.01, bce_weight=0.0, gate_lr=0.1, batch_size=64, workers=0))
    after = _gates(run)
    # with the BCE weight at zero, only the task loss is left; decoupled gates must not move at all
    assert all(torch.equal(gates_before[k], after[k]) for k in after)
    assert rep.final.reduction > 0 and rep.epochs[0].ce > 0


@pytest.mark.parametrize("mode,reaches_backbone", [("decoupled", False), ("joint", True)])
def test_bce_reaches_backbone_only_in_joint_mode(run, mode, reaches_backbone):
    m = ftwt_cli.load(run).train()
    torch.manual_seed(0)
    for p in m.gates.parameters():   # gates start with zero weights, which pass no gradient to their input
        torch.nn.init.normal_(p, std=0.1)
    m.set_gates("predict", r=0.9)
    with m.collecting(decoupled=mode == "decoupled"):
        m(torch.randn(4, 3, 16, 16))
    gate_loss(m.last_logits, m.last_targets).backward()
    got = any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.parameters())
    assert got == reaches_backbone
    assert all(p.grad is not None for p in m.gates.parameters())


def test_finetune_before_fit_gates_is_refused(run):
    with pytest.raises(FtwtError, match="not fitted yet"):
        finetune(run, "digits", FinetuneConfig(epochs=1, workers=0))


@pytest.mark.integration      # trains for tens of seconds on a 2-core CPU without AVX-512
def test_dense_control_trains_with_open_gates(run):
    before = ftwt_cli.load(run).state_dict()
    rep = finetune(run, "digits", FinetuneConfig(epochs=1, batch_size=64, workers=0), dense_control=True)
    after = rep.model.state_dict()
    assert rep.final.reduction == 0.0 and rep.epochs[0].val_macs_cut == 0.0          # every gate open: no MACs cut
    assert rep.epochs[0].val_top1 == rep.final.top1 and rep.epochs[0].bce == 0.0     # no gate loss
    gates = [k for k in before if k.startswith("gates.")]
    assert gates and all(torch.equal(before[k], after[k].cpu()) for k in gates)       # the gates did not learn
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before if k.startswith("backbone.")
               and before[k].is_floating_point())                                    # the backbone did


class _Snapshots:
    """A Progress that keeps the run's gates and backbone as saved at the end of every epoch."""

    def __init__(self, run):
        self.run, self.gates, self.backbone = run, [], []

    def start(self, *a): ...
    def step(self, *a): ...
    def validating(self): ...
    def note(self, text): ...

    def end(self, stats):
        self.gates.append(_gates(self.run))
        self.backbone.append(_backbone(self.run))


@pytest.mark.integration      # trains for tens of seconds on a 2-core CPU without AVX-512
def test_gates_freeze_after_the_given_fraction_of_finetune(run):
    fit_gates(run, "digits", FitGatesConfig(**{**FIT, "epochs": 1}))
    before = _gates(run)
    snaps = _Snapshots(run)
    finetune(run, "digits", FinetuneConfig(epochs=2, lr=0.01, gate_lr=0.05, batch_size=64, workers=0, freeze_gates_at=0.5),
             progress=snaps)
    (g1, g2), (b1, b2) = snaps.gates, snaps.backbone
    assert any(not torch.equal(before[k], g1[k]) for k in g1)          # learning in the first half
    assert all(torch.equal(g1[k], g2[k]) for k in g1)                   # frozen in the second
    assert any(not torch.equal(b1[k], b2[k]) for k in b1)               # while the backbone trains on
    with pytest.raises(FtwtError, match="freeze-gates-at=1.5"):
        FinetuneConfig(freeze_gates_at=1.5).validate()


def test_distill_loss_is_zero_at_the_teacher_and_scaled_by_t_squared():
    t = torch.randn(8, 10)
    assert distill_loss(t.clone(), t, 4.0).abs() < 1e-6
    s = torch.randn(8, 10)
    kl = (torch.softmax(t / 2, 1) * (torch.log_softmax(t / 2, 1) - torch.log_softmax(s / 2, 1))).sum(1).mean()
    assert distill_loss(s, t, 2.0) == pytest.approx(float(kl) * 4, rel=1e-5)


@pytest.mark.integration      # trains for tens of seconds on a 2-core CPU without AVX-512
def test_finetune_with_distillation_resumes_exactly(run, tmp_path):
    import shutil
    fit_gates(run, "digits", FitGatesConfig(**{**FIT, "epochs": 1}))
    other = tmp_path / "other"
    shutil.copytree(run, other)
    cfg = dict(epochs=2, lr=0.05, batch_size=64, workers=0, distill=0.7, distill_temp=3.0,
               schedule="constant")   # a cosine over 1 epoch would differ from the first half of one over 2
    full = finetune(run, "digits", FinetuneConfig(**cfg))
    with pytest.raises(KeyboardInterrupt):
        finetune(other, "digits", FinetuneConfig(**cfg), progress=StopAfter(1))
    # the teacher is the model finetune started from, not the checkpoint it resumes from
    resumed = finetune(other, "digits", FinetuneConfig(**cfg), resume=True)
    a, b = _backbone(run), _backbone(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.epochs[1].loss == pytest.approx(full.epochs[1].loss, rel=1e-6)
    with pytest.raises(FtwtError, match="distill=1.5"):
        finetune(run, "digits", FinetuneConfig(**{**cfg, "distill": 1.5}))


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("args,expect", [
    (["fit-gates", "--data", "digits", "--r", "1.5"], "outside (0, 1]"),
    (["fit-gates", "--data", "digits", "--r", "0"], "outside (0, 1]"),
    (["fit-gates", "--data", "/no/such/dir"], "data folder not found"),
    (["fit-gates", "--data", "digits", "--resume"], "nothing to resume"),
    (["fit-gates", "--data", "digits", "--recipe", "/no/recipe.yaml"], "recipe not found"),
    (["finetune", "--data", "digits", "--mode", "both"], "'both' is not one of 'decoupled', 'joint'"),
    (["finetune", "--data", "digits"], "not fitted yet"),
])
def test_cli_bad_input_leaves_run_intact(run, args, expect):
    before = {p.name: _sha(p) for p in run.iterdir()}
    res = runner.invoke(app, [*args, "--run", str(run), "--workers", "0"])
    assert res.exit_code == 2, res.output
    line = res.stderr.strip().splitlines()
    assert len(line) == 1 and expect in line[0] and "Traceback" not in res.output
    assert {p.name: _sha(p) for p in run.iterdir()} == before


def test_cli_missing_run_and_class_mismatch(tmp_path):
    res = runner.invoke(app, ["fit-gates", "--data", "digits", "--run", str(tmp_path / "none")])
    assert res.exit_code == 2 and "no ftwt run" in res.stderr
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), tmp_path / "five.pth")
    attach(tmp_path / "five.pth", arch="torchvision:resnet18", input_size=(3, 16, 16), run_dir=tmp_path / "five")
    res = runner.invoke(app, ["fit-gates", "--data", "digits", "--run", str(tmp_path / "five")])
    assert res.exit_code == 2 and "10 classes but the model's head has 5" in res.stderr


@pytest.mark.integration
def test_cli_fit_gates_and_finetune_end_to_end(run):
    res = runner.invoke(app, ["fit-gates", "--data", "digits", "--run", str(run), "--epochs", "1", "--r", "0.9",
                              "--batch-size", "64", "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert "fit-gates epoch 1:" in res.stdout and "gates fitted at r=0.9" in res.stdout
    res = runner.invoke(app, ["finetune", "--data", "digits", "--run", str(run), "--epochs", "1", "--batch-size", "64",
                              "--workers", "0", "--schedule", "step"])
    assert res.exit_code == 0, res.output
    assert "finetune epoch 1:" in res.stdout and (run / read_meta(run).files.checkpoint).is_file()
    meta = ftwt_cli.load(run).meta
    assert meta.training["finetune"].config["schedule"] == "step" and meta.training["fit-gates"].config["r"] == 0.9
    res = runner.invoke(app, ["evaluate", "--run", str(run), "--workers", "0"])      # --data defaults to the training data
    assert res.exit_code == 0, res.output
    assert "scikit-learn digits" in res.stdout and (run / "report.md").is_file()


def test_default_workers_are_saved_resolved(run):
    from ftwt_cli.data import default_workers
    rep = fit_gates(run, "digits", FitGatesConfig(**{**FIT, "epochs": 1, "workers": None}), train_samples=128)
    assert rep.config["workers"] == default_workers()
    assert read_meta(run).training["fit-gates"].config["workers"] == default_workers()
