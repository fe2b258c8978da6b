"""MACs: the dense count agrees with ptflops, and the dynamic count with an independent measurement."""
import copy

import pytest
import timm
import torch
import torchvision
from helpers import MacsMeter, no_natural_zeros
from ptflops import get_model_complexity_info
from ptflops.flops_counter import FLOPS_BACKEND

from ftwt_cli.arch.trace import trace_plan
from ftwt_cli.gating import GatedModel, gate_key


@pytest.mark.parametrize("name,expect_g", [("resnet18", 1.814), ("resnet34", 3.664), ("mobilenet_v2", 0.301), ("resnet50", 4.089)])
def test_dense_macs_agree_with_ptflops_aten(name, expect_g):
    m = torchvision.models.get_model(name).eval()
    ours = float(GatedModel(m, trace_plan(m, (3, 224, 224))).dense_macs().total[0])
    ref, _ = get_model_complexity_info(copy.deepcopy(m), (3, 224, 224), as_strings=False, print_per_layer_stat=False,
                                       backend=FLOPS_BACKEND.ATEN)
    assert abs(ours / ref - 1) < 0.01
    assert abs(ours / 1e9 - expect_g) < 0.0005


@pytest.mark.parametrize("build", [
    lambda: no_natural_zeros(torchvision.models.resnet18(num_classes=10)),
    lambda: no_natural_zeros(torchvision.models.mobilenet_v2(num_classes=10)),
    lambda: no_natural_zeros(timm.create_model("efficientnet_b0", num_classes=10)),   # SE, depthwise, SiLU
    lambda: no_natural_zeros(timm.create_model("mixnet_s", num_classes=10)),          # split → convs → cat
])
@pytest.mark.parametrize("mode", ["open", "oracle"])
def test_dynamic_macs_match_independent_measurement(build, mode):
    torch.manual_seed(0)
    m = build().eval()
    g = GatedModel(m, trace_plan(m, (3, 64, 64)), None).eval()
    g.set_gates(mode, r=0.85)
    meter, seen = MacsMeter(g), []
    for _ in range(2):
        measured = meter.run(torch.randn(3, 3, 64, 64))
        assert torch.allclose(g.last_stats.macs, measured, rtol=1e-12), (g.last_stats.macs, measured)
        seen.append(measured)
        if mode == "oracle":
            assert (g.last_stats.macs < g.last_stats.dense_macs).all()
    if mode == "oracle":
        assert not torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("build", [
    lambda: no_natural_zeros(torchvision.models.mobilenet_v2(num_classes=10)),
    lambda: no_natural_zeros(timm.create_model("efficientnet_b0", num_classes=10)),
])
def test_depthwise_followers_carry_the_mask_into_the_projection(build):
    """attach --depthwise-follow: every depthwise conv of an inverted residual takes its expansion's mask (no gate of its
    own), its masked channels are exact zeros, and the projection conv after it reads only the kept ones; the exact
    count still equals what the convs really read and write, and the cut is larger than without following."""
    torch.manual_seed(0)
    m = build().eval()
    plain = trace_plan(m, (3, 64, 64))
    plan = trace_plan(m, (3, 64, 64), depthwise_follow=True)
    followers = [u for u in plan.units if u.follows]
    assert followers and all(u.groups == u.in_channels == u.out_channels for u in followers)
    g = GatedModel(m, plan, None).eval().set_gates("oracle", r=0.85)
    assert all(gate_key(u.name) not in g.gates for u in followers)           # no gate of their own
    x = torch.randn(3, 3, 64, 64)
    measured = MacsMeter(g).run(x)
    s = g.last_stats
    assert torch.allclose(s.macs, measured, rtol=1e-12)
    for u in followers:
        assert torch.equal(s.masks[u.name], s.masks[u.follows])
    # the same expansion masks with the depthwise convs left ungated: their masked channels become BN(0) → act(β),
    # a constant, so the projection reads them all
    names = {u.name for u in followers}
    without = GatedModel(m, plain, [u.name for u in plain.units if u.name not in names]).eval().set_gates("predict")
    with torch.no_grad(), without.forcing({n: v for n, v in s.masks.items() if n not in names}):
        without(x)
    w = without.last_stats
    assert (s.macs - s.gate_macs < w.macs - w.gate_macs).all()
