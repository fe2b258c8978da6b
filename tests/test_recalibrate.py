"""BatchNorm recalibration under the gates' masks (``eval.recalibrate``): the running statistics become those of the
masked network's activations (or of one forced mask's), nothing else of the model changes, the statistics can be put
back, and fit-gates applies it when asked."""
import pytest
import torch
import torch.nn as nn

import ftwt_cli
from ftwt_cli.arch import trace_plan
from ftwt_cli.eval.recalibrate import kept_statistics, recalibrate_bn
from ftwt_cli.gating import GatedModel
from ftwt_cli.runtime.device import Precision
from ftwt_cli.train import FitGatesConfig, fit_gates


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def test_statistics_are_the_masked_activations_and_nothing_else_changes():
    net = _net()
    plan = trace_plan(net, (3, 16, 16))
    g = GatedModel(net, plan, [u.name for u in plan.units]).eval()
    # predicted masks: unit "0"'s gate reads the image, so its mask is the same whatever mode BN "1" is in
    with torch.no_grad():
        for prm in g.gates.parameters():
            prm.copy_(torch.randn(prm.shape, generator=torch.Generator().manual_seed(prm.numel())))
    g.set_gates("predict")
    xs = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    before = {k: v.clone() for k, v in g.state_dict().items()}
    with torch.no_grad():
        masks = []
        for x in xs:
            g(x)
            masks.append(g.last_stats.masks["0"])
    assert 0 < float(torch.cat(masks).float().mean()) < 1
    # what BN "4" reads under those masks: conv "3" of the masked ReLU output, with BN "1" using the batch's statistics
    expected_in = []
    with torch.no_grad():
        for x, m in zip(xs, masks):
            h = torch.relu(torch.nn.functional.batch_norm(net[0](x), None, None, net[1].weight, net[1].bias, True))
            expected_in.append(net[3](h * m[:, :, None, None].float()))
    seen = recalibrate_bn(g, xs, Precision(torch.device("cpu")))
    assert seen == 24 and not g.training and all(not m.training for m in g.modules())
    # cumulative average over the batches of each batch's mean and unbiased variance (BN's momentum=None)
    means = torch.stack([e.mean(dim=(0, 2, 3)) for e in expected_in]).mean(0)
    vars_ = torch.stack([e.var(dim=(0, 2, 3), unbiased=True) for e in expected_in]).mean(0)
    assert torch.allclose(net[4].running_mean, means, atol=1e-5) and torch.allclose(net[4].running_var, vars_, atol=1e-4)
    assert not torch.allclose(net[4].running_mean, before["backbone.4.running_mean"])
    assert net[1].momentum == 0.1 and net[4].momentum == 0.1
    after = g.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".running_" in k or "num_batches_tracked" in k for k in changed)


def test_a_forced_mask_sets_the_statistics_and_they_can_be_put_back():
    """Under one forced mask (the frozen majority control): unit "0" forced to keep channels 0-2 only, so conv "3"
    reads zeros on 3-7 and BN "4" learns the statistics of that input; on leaving ``kept_statistics`` every buffer is
    the run's again."""
    net = _net()
    plan = trace_plan(net, (3, 16, 16))
    g = GatedModel(net, plan, ["0"]).eval()
    g.set_gates("predict")
    keep = torch.zeros(8, dtype=torch.bool)
    keep[:3] = True
    xs = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    before = {k: v.clone() for k, v in g.named_buffers()}
    with torch.no_grad():
        expected = [net[3](torch.relu(torch.nn.functional.batch_norm(net[0](x), None, None, net[1].weight, net[1].bias,
                                                                     True)) * keep[None, :, None, None].float()) for x in xs]
    with kept_statistics(g):
        assert recalibrate_bn(g, xs, Precision(torch.device("cpu")), forced={"0": keep}) == 16
        means = torch.stack([e.mean(dim=(0, 2, 3)) for e in expected]).mean(0)
        assert torch.allclose(net[4].running_mean, means, atol=1e-5)
        assert not torch.allclose(net[4].running_mean, before["backbone.4.running_mean"])
    assert all(torch.equal(v, before[k]) for k, v in g.named_buffers())


@pytest.mark.parametrize("images", [0, 256])
def test_fit_gates_recalibrates_when_asked(run, images):
    before = {k: v.clone() for k, v in ftwt_cli.load(run).state_dict().items() if "running_mean" in k}
    cfg = FitGatesConfig(r=0.9, epochs=1, lr=0.05, batch_size=64, workers=0, recalibrate_bn=images)
    fit_gates(run, "digits", cfg, train_samples=128)
    m = ftwt_cli.load(run)
    after = {k: v for k, v in m.state_dict().items() if "running_mean" in k}
    same = all(torch.equal(before[k], after[k]) for k in before)
    assert same == (images == 0)
    assert m.meta.training["fit-gates"].config["recalibrate_bn"] == images
