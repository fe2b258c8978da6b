"""MACs: the dense count agrees with ptflops, and the dynamic count with an independent measurement."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from ptflops import get_model_complexity_info
from ptflops.flops_counter import FLOPS_BACKEND

from ftwt_cli.dataflow import trace_plan
from ftwt_cli.gating import GatedModel


@pytest.mark.parametrize("name,expect_g", [("resnet18", 1.814), ("resnet34", 3.664), ("mobilenet_v2", 0.301), ("resnet50", 4.089)])
def test_dense_macs_agree_with_ptflops_aten(name, expect_g):
    m = torchvision.models.get_model(name).eval()
    ours = float(GatedModel(m, trace_plan(m, (3, 224, 224))).dense_macs().total[0])
    ref, _ = get_model_complexity_info(copy.deepcopy(m), (3, 224, 224), as_strings=False, print_per_layer_stat=False,
                                       backend=FLOPS_BACKEND.ATEN)
    assert abs(ours / ref - 1) < 0.01
    assert abs(ours / 1e9 - expect_g) < 0.0005


def _no_natural_zeros(model: nn.Module) -> nn.Module:
    """Swap ReLU/ReLU6 for LeakyReLU (f(0)=0 too) and give every norm a non-zero random scale (timm zero-inits
    some), so that every all-zero channel the hooks see is a structural one."""
    g = torch.Generator().manual_seed(0)
    for name, m in list(model.named_modules()):
        for cname, c in list(m.named_children()):
            if isinstance(c, (nn.ReLU, nn.ReLU6)):
                setattr(m, cname, nn.LeakyReLU(0.1))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    return model


class _Measure:
    """Independent count: forward hooks that see the tensors each conv/linear really reads and writes."""

    def __init__(self, g: GatedModel):
        self.g, self.macs, self.handles = g, None, []
        mods = dict(g.backbone.named_modules())
        ends = {u.end: u.name for u in g.units}
        self.out_active = {}
        for op in g.plan.ops:
            self.handles.append(mods[op.name].register_forward_hook(self._op_hook(op)))
        for end, conv in ends.items():   # registered after the mask hook: sees the masked output
            self.handles.append(mods[end].register_forward_hook(self._end_hook(conv)))

    def _end_hook(self, conv):
        def hook(m, args, out):
            self.out_active[conv] = out.flatten(2).ne(0).any(2)
        return hook

    def _op_hook(self, op):
        def hook(m, args, out):
            x = args[0]
            a_in = x.flatten(2).ne(0).any(2) if x.dim() > 2 else x.ne(0)
            self.pending.append((op, a_in, out))
        return hook

    def run(self, x):
        self.pending, self.out_active = [], {}
        with torch.no_grad():
            self.g(x)
        B = x.shape[0]
        total = torch.zeros(B, dtype=torch.float64)
        gated = {u.name: u for u in self.g.units}
        for op, a_in, out in self.pending:
            a_out = self.out_active.get(op.name, torch.ones(B, op.out_channels, dtype=torch.bool)) if op.name in gated and self.g.mode != "open" \
                else torch.ones(B, op.out_channels, dtype=torch.bool)
            pos = out[0, 0].numel() if op.kind == "conv" else 1
            cin, cout = op.in_channels // op.groups, op.out_channels // op.groups
            for b in range(B):
                for grp in range(op.groups):
                    i = int(a_in[b, grp * cin:(grp + 1) * cin].sum())
                    o = int(a_out[b, grp * cout:(grp + 1) * cout].sum())
                    total[b] += i * o * op.kernel_area * pos
                if op.name in gated and self.g.mode != "open":
                    total[b] += int(a_in[b].sum()) * op.out_channels     # the gate: GAP → Linear on the same input
        return total


@pytest.mark.parametrize("build", [
    lambda: _no_natural_zeros(torchvision.models.resnet18(num_classes=10)),
    lambda: _no_natural_zeros(torchvision.models.mobilenet_v2(num_classes=10)),
    lambda: _no_natural_zeros(timm.create_model("efficientnet_b0", num_classes=10)),   # SE, depthwise, SiLU
    lambda: _no_natural_zeros(timm.create_model("mixnet_s", num_classes=10)),          # split → convs → cat
])
@pytest.mark.parametrize("mode", ["open", "oracle"])
def test_dynamic_macs_match_independent_measurement(build, mode):
    torch.manual_seed(0)
    m = build().eval()
    g = GatedModel(m, trace_plan(m, (3, 64, 64)), None).eval()
    g.set_gates(mode, r=0.85)
    meter, seen = _Measure(g), []
    for _ in range(2):                    # the second forward reuses the MACs plan with other masks
        measured = meter.run(torch.randn(3, 3, 64, 64))
        assert torch.allclose(g.last_stats.macs, measured, rtol=1e-12), (g.last_stats.macs, measured)
        seen.append(measured)
        if mode == "oracle":
            assert (g.last_stats.macs < g.last_stats.dense_macs).all()
    assert len(g._macs_plans) == 1
    if mode == "oracle":
        assert not torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_macs_plan_matches_a_fresh_count_per_op(name):
    """A plan built on one forward's masks, run on another's, gives what a count from scratch gives, op by op.
    ResNet-18 reads the OR of two masks after its first residual sum (new flags every forward); MobileNetV2's
    depthwise convs go op by op."""
    from ftwt_cli.macs import MacsPlan, count_macs
    torch.manual_seed(0)
    m = torchvision.models.get_model(name, num_classes=10).eval()
    g = GatedModel(m, trace_plan(m, (3, 32, 32))).eval().set_gates("oracle", r=0.7)
    with torch.no_grad():
        g(torch.randn(2, 3, 32, 32))
    st = g._last[0]
    plan = MacsPlan.build(g.plan.ops, g.units, dict(st.masks), st.positions, 2, gates_run=True)
    assert any(kind == "expr" for kind, *_ in plan.sources) if name == "resnet18" else plan.grouped
    with torch.no_grad():
        g(torch.randn(2, 3, 32, 32))
    st = g._last[0]
    got, want = plan.run(st.masks), count_macs(g.plan.ops, g.units, st.masks, st.positions, 2, gates_run=True)
    assert torch.equal(got.total, want.total) and torch.equal(got.gates, want.gates)
    assert list(got.per_op) == list(want.per_op)
    assert all(torch.equal(got.per_op[k], want.per_op[k]) for k in want.per_op)
    assert torch.equal(got.total, g.last_stats.macs)


def test_macs_plan_built_on_aliased_masks_counts_each_layer_later():
    """Layers whose masks were one shared tensor when the plan was built (replayed all-ones masks, say) still get
    their own counts once their masks differ."""
    from ftwt_cli.macs import MacsPlan, count_macs
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    g = GatedModel(m, trace_plan(m, (3, 32, 32))).eval().set_gates("oracle", r=0.7)
    with torch.no_grad():
        g(torch.randn(2, 3, 32, 32))
    st = g._last[0]
    shared = torch.ones(2, 64, dtype=torch.bool)
    aliased = {n: (shared if v.shape[1] == 64 else v) for n, v in st.masks.items()}
    plan = MacsPlan.build(g.plan.ops, g.units, aliased, st.positions, 2, gates_run=True)
    want = count_macs(g.plan.ops, g.units, st.masks, st.positions, 2, gates_run=True)
    assert torch.equal(plan.run(st.masks).total, want.total)
