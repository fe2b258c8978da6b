"""Surgery on tiny hand-built nets whose dataflow we know by heart."""
import pytest
import torch
import torch.nn as nn

from ftwt_cli.dataflow import trace_plan
from ftwt_cli.gating import GatedModel, gate_key
from ftwt_cli import train
from ftwt_cli.train import gate_grads, gate_loss


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
        acts = [nn.ReLU(inplace=True), nn.ReLU6(), nn.LeakyReLU(0.3), nn.Tanh(), nn.SiLU(), nn.Hardswish()]
        self.layers = nn.ModuleList(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), a) for a in acts)
        self.res = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.head = nn.Conv2d(4, 2, 1)        # the model's output itself is never gated

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x + self.res(x))


@pytest.mark.parametrize("size", [16, 8, 4, 1])  # 16: max |y| from a max and a min pass; 4, 1: _over_maps' special cases
def test_ground_truth_scores_equal_spatial_max_abs_activation(size):
    torch.manual_seed(0)
    net = _ActNet().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):          # push maps to both signs and past ReLU6's 6
            nn.init.normal_(m.bias, std=3.0)
            nn.init.normal_(m.weight, std=3.0)
    g = GatedModel(net, trace_plan(net, (4, size, size))).eval()
    seen = {}
    hooks = {h.unit.name: h for m in net.modules() for h in m._forward_hooks.values() if hasattr(h, "_scores")}
    for name, hook in hooks.items():
        end = net.get_submodule(hook.unit.end)
        end.register_forward_hook(lambda mod, a, out, n=name: seen.__setitem__(n, out.detach().clone()))
    with torch.no_grad():
        g(torch.randn(3, 4, size, size))
    assert len(seen) == 7
    for name, out in seen.items():
        act = hooks[name].unit.act
        f = net.get_submodule(act) if act not in (None, "relu") else (lambda t: t)
        want = f(out.clone()).abs().amax(dim=(2, 3))
        before = out.clone()
        assert torch.allclose(hooks[name]._scores(out), want, atol=1e-6), (name, act)
        assert torch.equal(out, before), name               # in-place activations ran on a copy
    pooled = g.gates[gate_key(g.units[1].name)].pool(before)
    assert torch.allclose(pooled, before.mean((2, 3)), atol=1e-6) and pooled.data_ptr() != before.data_ptr()


def test_in_place_masking_matches_the_autograd_path():
    torch.manual_seed(0)
    net, plan = _plan()
    g = GatedModel(net, plan).eval()
    for p in g.gates.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(4, 3, 16, 16)
    for mode in ("oracle", "predict"):
        g.set_gates(mode, r=0.7)
        ref = g(x)                                   # backbone weights require grad: masks multiply out of place
        with torch.no_grad():
            fast = g(x)                              # nothing records: masks multiply in place
        assert torch.equal(ref.detach(), fast)


@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("logit_scale", [1.0, 400.0])     # 400: logits far beyond ±80, where σ(z) underflows
def test_frozen_backbone_gate_grads_equal_autograd(logit_scale, wdt, monkeypatch):
    """fit-gates: with a frozen backbone nothing records, and gate_grads gives the loss and gradients that
    autograd gives through the float64 BCE (gate_loss), confidently wrong gates included; weight gradients
    computed in bfloat16 (CPUs with native bf16) agree to bf16's precision."""
    monkeypatch.setattr(train, "_weight_grad_dtype", lambda device, weights: wdt)
    torch.manual_seed(0)
    net, plan = _plan()
    g = GatedModel(net, plan).eval()
    for p in g.gates.parameters():
        torch.nn.init.normal_(p, std=0.5 * logit_scale)
    x = torch.randn(4, 3, 16, 16)
    g.set_gates("predict", r=0.7)
    g.collect_targets = True
    g(x)
    lg, tg = torch.cat(list(g.last_logits.values()), 1), torch.cat(list(g.last_targets.values()), 1)
    assert bool((lg * (2 * tg.float() - 1)).amin() < -80) == (logit_scale > 1)     # gates sure of the wrong answer
    want_loss = gate_loss(g)
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in g.gates.named_parameters()}
    g.zero_grad(set_to_none=True)
    g.frozen_backbone = True
    out = g(x)
    assert not out.requires_grad and not any(v.requires_grad for v in g.last_logits.values())
    assert torch.allclose(gate_grads(g), want_loss.detach(), rtol=1e-6)
    for n, p in g.gates.named_parameters():
        assert p.grad.dtype == torch.float32
        if wdt == torch.float32 or n.endswith("bias"):
            assert torch.allclose(p.grad, want[n], rtol=1e-5, atol=1e-8), n
        else:                                        # 8-bit mantissa: ~0.4% of the largest entry
            assert (p.grad - want[n]).abs().max() <= 1e-2 * want[n].abs().max(), n
    assert all(p.grad is None for p in g.backbone.parameters())


@pytest.mark.parametrize("n", [4096, 4097, 4098, 4099])
def test_sum_log_of_products_matches_float64_logs(n):
    """gate_grads' loss sums logs of products of four sigmoids; down to σ(−20) nothing underflows."""
    torch.manual_seed(n)
    p = torch.sigmoid(torch.randn(n) * 10).clamp_min(float(torch.sigmoid(torch.tensor(train._Z_MIN))))
    want = p.double().log().sum()
    assert abs(float(train._sum_log(p)) - float(want)) <= 1e-6 * abs(float(want))


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
        g.collect_targets = True
        g(x)
        g.set_gates("predict", r=0.9)                # changing r afterwards does not change that forward's targets
        got = g.last_targets
    assert set(got) == {u.name for u in g.units}
    assert torch.equal(got[first], want) and not want.all()


@pytest.mark.parametrize("hw", [1, 2, 3, 4, 8])
def test_over_maps_matches_torch_reductions(hw):
    from ftwt_cli.gating import _over_maps
    x = torch.randn(3, 5, hw, hw)
    for reduce in ("amax", "amin", "mean"):
        got = _over_maps(x, reduce)
        assert torch.allclose(got, getattr(x, reduce)(dim=(2, 3)), atol=1e-6), reduce
        assert got.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("batch,c_in,c_out", [(128, 512, 512), (2, 64, 32)])    # above / below _DNNL_MIN_MACS
def test_gate_linear_equals_f_linear(batch, c_in, c_out, monkeypatch):
    from ftwt_cli import gating
    torch.manual_seed(0)
    p, w, b = torch.rand(batch, c_in), torch.randn(c_out, c_in) * 0.05, torch.randn(c_out)
    want = torch.nn.functional.linear(p, w, b)
    got = gating.gate_linear(p, w, b)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    out = torch.empty(batch, c_out)
    assert gating.gate_linear(p, w, b, out=out) is out and torch.equal(out, got)
    monkeypatch.setattr(gating, "_DNNL_LINEAR", None)            # a torch build without it: addmm
    assert torch.equal(gating.gate_linear(p, w, b), want)


def test_gate_linear_takes_onednn_only_where_nothing_needs_a_gradient(monkeypatch):
    from ftwt_cli import gating
    real = gating._DNNL_LINEAR
    if real is None:
        pytest.skip("this torch build has no oneDNN linear")
    calls = []
    monkeypatch.setattr(gating, "_DNNL_LINEAR", lambda *a: calls.append(a[0].shape) or real(*a))
    p = torch.rand(128, 256)
    w, b = torch.randn(512, 256, requires_grad=True), torch.zeros(512, requires_grad=True)
    gating.gate_linear(p, w, b).sum().backward()                 # finetune: autograd's addmm
    assert calls == [] and w.grad is not None
    with torch.no_grad():
        gating.gate_linear(p, w, b)                              # evaluation, fit-gates
        gating.gate_linear(p[:2], w, b)                          # too small a product: addmm
        wd, bd = w.detach(), b.detach()
        traced = torch.jit.trace(lambda q: gating.gate_linear(q, wd, bd), (p,), check_trace=False)
    assert calls == [(128, 256)]                                 # a traced graph holds addmm, not the private op
    assert "mkldnn" not in str(traced.graph)


def test_weight_gradients_run_in_bf16_only_for_large_gates():
    cpu = torch.device("cpu")
    assert train._weight_grad_dtype(cpu, 64 * 64) == torch.float32
    big = train._weight_grad_dtype(cpu, 512 * 512)
    assert big == (torch.bfloat16 if train._native_bf16(cpu) else torch.float32)


def test_gate_grads_of_a_float64_model():
    """Gradient products in a dtype other than the logits' (float32 for these small gates) convert per gate."""
    torch.manual_seed(0)
    net, plan = _plan()
    g = GatedModel(net, plan).eval().double().set_gates("predict", r=0.7)
    for p in g.gates.parameters():
        torch.nn.init.normal_(p, std=0.5)
    g.collect_targets = True
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    g(x)
    gate_loss(g).backward()
    want = {n: p.grad.clone() for n, p in g.gates.named_parameters()}
    g.zero_grad(set_to_none=True)
    g.frozen_backbone = True
    g(x)
    gate_grads(g)
    for n, p in g.gates.named_parameters():
        assert p.grad.dtype == torch.float64 and torch.allclose(p.grad, want[n], rtol=1e-5, atol=1e-7), n
