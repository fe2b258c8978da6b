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
from ftwt_cli.gating import GatedModel


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
