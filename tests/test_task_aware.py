"""Task-aware gates (finetune --task-aware): straight-through masks let the task loss and a MACs budget term reach the
gates, while the forward stays the hard-masked model bit for bit."""
import shutil

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import one_line_error, tree
from typer.testing import CliRunner

import ftwt_cli
from ftwt_cli.attach import attach
from ftwt_cli.cli import app
from ftwt_cli.errors import FtwtError
from ftwt_cli.gating.macs import active_channels
from ftwt_cli.train.config import FinetuneConfig
from ftwt_cli.train.loops import budget_loss, finetune

runner = CliRunner()


def _predicting(run, std=0.3):
    """A run's model with gate logits of both signs (random gate weights), training mode."""
    m = ftwt_cli.load(run).train()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.gates.parameters():
            p.normal_(0, std)
    return m.set_gates("predict", r=0.9)


def test_straight_through_masks_forward_the_hard_model_and_carry_the_task_loss_to_the_gates(run):
    m = _predicting(run)
    torch.manual_seed(1)
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    with m.collecting(decoupled=True):
        hard = m(x)
    masks, macs = {k: v.clone() for k, v in m.last_masks.items()}, m.last_stats.macs.clone()
    assert any(0 < v.float().mean() < 1 for v in masks.values())          # some channels closed, some open
    F.cross_entropy(hard, y).backward()
    assert all(p.grad is None for p in m.gates.parameters())             # hard masks: no task gradient to the gates
    with m.collecting(decoupled=True, straight_through=True):
        out = m(x)
    assert torch.equal(out, hard)                                        # the same forward, bit for bit
    assert all(torch.equal(m.last_masks[k], v) for k, v in masks.items())
    assert torch.equal(m.last_stats.macs, macs)
    F.cross_entropy(out, y).backward()
    grads = [p.grad for p in m.gates.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_differentiable_macs_are_the_exact_count_and_grow_with_every_gate_bias(run):
    m = _predicting(run)
    with m.collecting(straight_through=True):
        m(torch.randn(4, 3, 16, 16))
    macs = m.differentiable_macs()
    assert macs.requires_grad and torch.equal(macs.detach(), m.last_stats.macs)
    macs.sum().backward()
    biases = [g.fc.bias.grad for g in m.gates.values()]
    # opening a channel never lowers the MACs: every bias gradient is ≥ 0, and each gate's is > 0 somewhere
    assert all(b is not None and bool((b >= 0).all()) and float(b.sum()) > 0 for b in biases)
    with pytest.raises(ValueError):
        with m.collecting():
            m(torch.randn(2, 3, 16, 16))
        m.differentiable_macs()                                          # hard masks carry no gradient


def test_float_masks_give_the_counts_of_bool_masks():
    torch.manual_seed(0)
    a, b = torch.rand(5, 8) > 0.5, torch.rand(5, 8) > 0.5
    bools, floats = {"a": a, "b": b}, {"a": a.float().requires_grad_(), "b": b.float()}
    for expr in [("any", (("unit", "a"), ("unit", "b"))), ("all", (("unit", "a"), ("unit", "b"))),
                 ("cat", (("unit", "a"), ("dense", 3))), ("repeat", ("slice", ("unit", "b"), 2, 6), 2)]:
        want, got = active_channels(expr, bools, 5), active_channels(expr, floats, 5)
        assert got.dtype == torch.float32 and torch.equal(got.bool(), want) and torch.equal(got, want.float())


def test_closed_macs_keep_only_the_ungated_work(run):
    m = ftwt_cli.load(run)
    dense = float(m.dense_macs().total[0])
    closed = m.closed_macs()
    # every gated conv computes nothing, and its readers (a gate too) read nothing from it: what is left is the
    # ungated convs on dense inputs (the stem, the shortcuts, each block's first conv reading the residual stream)
    assert 0 < closed < 0.5 * dense
    with torch.no_grad():
        m.set_gates("predict")(torch.zeros(1, 3, 16, 16))
    assert closed < float(m.last_stats.macs[0])                          # less than any real mask costs
    assert budget_loss(torch.tensor([closed, closed], dtype=torch.float64), dense, 0.3) == \
        pytest.approx((closed / dense - 0.7) ** 2)


# more cut than the fitted gates give, and less (12 s each: the second runs with the integration set)
@pytest.mark.parametrize("offset", [0.25, pytest.param(-0.1, marks=pytest.mark.integration)])
def test_the_budget_term_steers_finetune_to_the_target_cut(fitted, tmp_path, offset):
    run = tmp_path / "run"
    shutil.copytree(fitted, run)                          # gates fitted one epoch at r = 0.9 (conftest)
    start = ftwt_cli.load(run).meta.last_eval.reduction
    target = min(start + offset, 0.8)
    rep = finetune(run, "digits", FinetuneConfig(epochs=1, lr=0.01, gate_lr=0.05, task_aware=True, target_cut=target,
                                                 budget_weight=50.0, batch_size=64, workers=0))
    got = rep.final.reduction
    assert abs(got - target) < 0.5 * abs(start - target), (start, got, target)
    # with a budget the BCE is off unless asked for, and the weight used is what the run saves
    assert rep.config["task_aware"] and rep.config["target_cut"] == target and rep.config["bce_weight"] == 0.0


def test_a_budget_needs_task_aware_gates_and_must_be_reachable(fitted, tmp_path):
    with pytest.raises(FtwtError, match="add --task-aware"):
        FinetuneConfig(target_cut=0.5).validate()
    run = tmp_path / "run"
    shutil.copytree(fitted, run)
    before = tree(run)
    res = runner.invoke(app, ["finetune", "--run", str(run), "--data", "digits", "--target-cut", "0.5"])
    one_line_error(res, "--task-aware")
    res = runner.invoke(app, ["finetune", "--run", str(run), "--data", "digits", "--task-aware", "--target-cut", "0.99",
                              "--workers", "0"])
    one_line_error(res, "cannot be reached")
    assert tree(run) == before                                            # nothing written


def test_sweep_refuses_one_budget_for_many_points(tmp_path):
    from ftwt_cli.sweep import run_sweep
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(FtwtError, match="its own --target-cuts"):
        run_sweep(tmp_path / "r18.pth", "digits", tmp_path / "sweep", target_cuts=[0.3],
                  finetune_cfg=FinetuneConfig(task_aware=True, target_cut=0.3))
    assert not (tmp_path / "sweep").exists()


def test_task_aware_gates_under_a_followed_depthwise_conv(tmp_path):
    """MobileNetV2 with --depthwise-follow: a follower multiplies by its leader's straight-through mask, so the leader's
    gate also learns from the depthwise conv's (and its readers') share of the task loss and the MACs."""
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v2(num_classes=10).state_dict(), tmp_path / "m.pth")
    attach(tmp_path / "m.pth", arch="torchvision:mobilenet_v2", input_size=(3, 32, 32), run_dir=tmp_path / "run",
           depthwise_follow=True)
    m = _predicting(tmp_path / "run")
    followers = [u for u in m.units if u.follows]
    assert followers
    with m.collecting(straight_through=True):
        out = m(torch.randn(3, 3, 32, 32))
    macs = m.differentiable_macs()
    assert torch.equal(macs.detach(), m.last_stats.macs)
    (out.square().mean() + macs.mean() / 1e6).backward()
    lead = m.gates[followers[0].follows.replace(".", "__")]
    assert lead.fc.bias.grad is not None and float(lead.fc.bias.grad.abs().sum()) > 0
