"""Surgery on tiny hand-built nets whose dataflow we know by heart."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ftwt_cli.arch.trace import trace_plan
from ftwt_cli.gating import GatedModel, heatmap_mass
from ftwt_cli.train import gate_loss


class Block(nn.Module):
    """A ResNet basic block with a 1×1 downsample shortcut and one shared ReLU (as torchvision's)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.down(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block(8, 16)
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6())
        self.branch_a = nn.Conv2d(16, 4, 1)
        self.branch_b = nn.Sequential(nn.Conv2d(16, 6, 1), nn.ReLU())
        self.after_cat = nn.Conv2d(10, 12, 3, padding=1)
        self.sig = nn.Sequential(nn.Conv2d(12, 12, 1), nn.Sigmoid())
        self.split_conv = nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(12 + 5, 3)
        self.cls = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        x = self.dw(self.block(self.stem(x)))
        x = torch.cat([self.branch_a(x), self.branch_b(x)], 1)          # 4 + 6 channels
        y = self.after_cat(x)
        y = self.sig(y)
        _, right = torch.split(x, [4, 6], dim=1)
        z = self.split_conv(right)
        feats = torch.cat([y.mean((2, 3)), z.mean((2, 3))], 1)
        return self.fc(feats)


def _plan(**kw):
    torch.manual_seed(0)
    net = Net().eval()
    return net, trace_plan(net, (3, 16, 16), **kw)


def test_units_and_reasons():
    _, plan = _plan()
    units = {u.name: u for u in plan.units}
    assert set(units) == {"stem.0", "block.conv1", "block.conv2", "dw.0", "branch_a", "branch_b.0", "after_cat", "split_conv"}
    assert units["stem.0"].end == "stem.1" and units["stem.0"].act == "stem.2"
    assert units["block.conv1"].end == "block.bn1" and units["block.conv1"].act == "block.relu"  # shared ReLU
    assert units["block.conv2"].end == "block.bn2" and units["block.conv2"].act is None          # before the add
    assert units["dw.0"].groups == 16
    assert units["branch_a"].end == "branch_a"                                                   # no norm: conv output
    assert "shortcut" in plan.rejected["block.down.0"]
    assert "f(0)≠0" in plan.rejected["sig.0"]
    assert "cls" not in units and "cls" in plan.rejected                                         # never called


def test_shortcut_gated_on_request():
    _, plan = _plan(gate_shortcuts=True)
    assert any(u.name == "block.down.0" and u.shortcut for u in plan.units)


def test_sparsity_expressions_follow_dataflow():
    _, plan = _plan()
    ops = {o.name: o for o in plan.ops}
    assert ops["stem.0"].in_expr == ["dense", 3]
    assert ops["block.conv1"].in_expr == ["unit", "stem.0", 8]
    assert ops["block.down.0"].in_expr == ["unit", "stem.0", 8]
    # the residual sum is dense because the shortcut is not gated
    assert ops["dw.0"].in_expr == ["dense", 16]
    assert ops["branch_a"].in_expr == ["unit", "dw.0", 16]
    assert ops["after_cat"].in_expr == ["cat", [["unit", "branch_a", 4], ["unit", "branch_b.0", 6]]]
    assert ops["split_conv"].in_expr == ["slice", ops["after_cat"].in_expr, 4, 10]
    assert ops["fc"].in_expr == ["cat", [["dense", 12], ["unit", "split_conv", 5]]]


def test_residual_sum_is_sparse_only_where_both_terms_are():
    _, plan = _plan(gate_shortcuts=True)
    ops = {o.name: o for o in plan.ops}
    assert ops["dw.0"].in_expr == ["any", [["unit", "block.conv2", 16], ["unit", "block.down.0", 16]]]


def test_open_gates_are_exact_and_hooks_leave_model_usable():
    net, plan = _plan()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
        g = GatedModel(net, plan).eval()
        assert torch.equal(g(x), ref)
        g.set_gates("oracle", r=0.6)
        y = g(x)
    assert not torch.equal(y, ref)
    m = g.last_stats.masks["block.conv2"]
    assert m.shape == (2, 16) and m.dtype == torch.bool and not m.all()
    assert (g.last_stats.macs < g.last_stats.dense_macs).all()


def test_trace_restores_train_mode_and_leaves_no_hooks():
    net = Net().train()
    trace_plan(net, (3, 16, 16))
    assert net.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


class _ActNet(nn.Module):
    """One unit per activation kind the ground truth special-cases, plus one before a residual add."""

    def __init__(self):
        super().__init__()
        acts = [nn.ReLU(inplace=True), nn.ReLU6(), nn.LeakyReLU(0.3), nn.Tanh(), nn.SiLU(inplace=True), nn.Hardswish()]
        self.layers = nn.ModuleList(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), a) for a in acts)
        self.res = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.head = nn.Conv2d(4, 2, 1)        # the model's output itself is never gated

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x + self.res(x))


@pytest.mark.parametrize("size", [16, 4, 1])
def test_ground_truth_ranks_spatial_max_abs_activation(size):
    """The targets collected in a forward are the heatmap-mass rule on max |activation(unit output)| over each
    map, for every activation kind (monotone ones take a shortcut), and in-place activations leave the output be."""
    torch.manual_seed(0)
    net = _ActNet().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):          # push maps to both signs and past ReLU6's 6
            nn.init.normal_(m.bias, std=3.0)
            nn.init.normal_(m.weight, std=3.0)
    g = GatedModel(net, trace_plan(net, (4, size, size))).eval().set_gates("open", r=0.7)
    seen = {}
    for u in g.units:
        net.get_submodule(u.end).register_forward_hook(lambda mod, a, out, n=u.name: seen.__setitem__(n, out.detach().clone()))
    x = torch.randn(3, 4, size, size)
    with torch.no_grad():
        ref = net(x)
        with g.collecting():
            assert torch.equal(g(x), ref)          # open gates, scoring only
    targets = g.last_targets
    assert len(seen) == len(targets) == 7
    for u in g.units:
        f = net.get_submodule(u.act) if u.act not in (None, "relu") else (lambda t: t)
        want = heatmap_mass(f(seen[u.name].clone()).abs().amax(dim=(2, 3)), 0.7)
        assert torch.equal(targets[u.name], want), (u.name, u.act)


def test_masking_with_and_without_autograd_agree():
    torch.manual_seed(0)
    net, plan = _plan()
    g = GatedModel(net, plan).eval()
    for p in g.gates.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(4, 3, 16, 16)
    for mode in ("oracle", "predict"):
        g.set_gates(mode, r=0.7)
        ref = g(x)
        with torch.no_grad():
            fast = g(x)
        assert torch.equal(ref.detach(), fast)


def test_gate_loss_is_summed_over_filters_and_averaged_over_layers_and_batch():
    """FTWT eq. 2, against a per-layer computation; with the backbone frozen, autograd reaches only the gates."""
    torch.manual_seed(0)
    net, plan = _plan()
    g = GatedModel(net, plan).eval().set_gates("predict", r=0.7)
    for p in g.gates.parameters():
        torch.nn.init.normal_(p, std=0.5)
    g.backbone.requires_grad_(False)
    x = torch.randn(4, 3, 16, 16)
    with g.collecting():
        g(x)
    lg, tg = g.last_logits, g.last_targets
    want = torch.stack([F.binary_cross_entropy_with_logits(lg[n], tg[n].float(), reduction="sum") / 4 for n in tg]).mean()
    loss = gate_loss(lg, tg)
    assert torch.allclose(loss, want, rtol=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.gates.parameters())
    assert all(p.grad is None for p in g.backbone.parameters())


def test_collected_targets_are_ranked_after_the_forward_with_its_own_r():
    torch.manual_seed(0)
    net, plan = _plan()
    g = GatedModel(net, plan).eval()
    x = torch.randn(4, 3, 16, 16)
    first = g.units[0].name                          # reads the image: the same input whatever the masks
    with torch.no_grad():
        g.set_gates("oracle", r=0.7)(x)
        want = g.last_stats.masks[first]
        g.set_gates("predict", r=0.7)
        with g.collecting():
            g(x)
        g.set_gates("predict", r=0.9)                # changing r afterwards does not change that forward's targets
        got = g.last_targets
    assert set(got) == {u.name for u in g.units}
    assert torch.equal(got[first], want) and not want.all()


def test_forced_masks_are_applied_and_recorded():
    torch.manual_seed(0)
    net, plan = _plan()
    g = GatedModel(net, plan).eval().set_gates("predict")
    x = torch.randn(2, 3, 16, 16)
    masks = {u.name: torch.rand(2, u.out_channels) < 0.5 for u in g.units}
    with torch.no_grad(), g.forcing(masks):
        g(x)
    assert all(torch.equal(g.last_masks[n], m) for n, m in masks.items())
    with torch.no_grad():
        g(x)                                         # outside the block the gates decide again (all open at init)
    assert all(m.all() for m in g.last_masks.values())


def test_hooks_survive_sync_batchnorm_conversion():
    """Converting norms to SyncBatchNorm after GatedModel is built replaces the hooked modules; the next forward hooks
    the new ones, so every unit is still masked (SyncBatchNorm runs on CPU in eval mode)."""
    torch.manual_seed(0)
    net, plan = _plan()
    g = GatedModel(net, plan).eval().set_gates("oracle", r=0.6)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = g(x)
        assert nn.SyncBatchNorm.convert_sync_batchnorm(g) is g
        assert isinstance(net.block.bn1, nn.SyncBatchNorm)
        assert torch.equal(g(x), ref)
    assert set(g.last_masks) == {u.name for u in g.units}


def test_copies_have_their_own_hooks_and_plain_backbone_keeps_a_users_hook():
    torch.manual_seed(0)
    net, plan = _plan()
    calls = []
    net.stem.register_forward_hook(lambda m, a, out: calls.append(1))      # a user's hook
    g = GatedModel(net, plan).eval().set_gates("oracle", r=0.6)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = g(x)
        c = copy.deepcopy(g)
        assert torch.equal(c(x), ref)
        c.set_gates("open")
        assert torch.equal(g(x), ref) and not torch.equal(c(x), ref)
        plain = g.plain_backbone()
        n = len(calls)
        y = plain(x)
    assert len(calls) > n                            # the user's hook travelled with the copy
    g.set_gates("open")
    with torch.no_grad():
        assert torch.equal(y, g(x))                  # ... and ours did not: the plain copy is the dense network
