"""FTWT's counter (``gating.ftwt_count``) on a hand-built residual block, the frozen-mask control (``eval.frozen``) and
the gate diagnostics ``ftwt evaluate`` reports."""
import pytest
import torch
import torch.nn as nn

from ftwt_cli.arch import trace_plan
from ftwt_cli.eval.frozen import frozen_masks
from ftwt_cli.gating import GatedModel
from ftwt_cli.gating.ftwt_count import ftwt_counter_macs


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.a, self.bna = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b, self.bnb = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c, self.bnc = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = self.bnb(self.b(torch.relu(self.bna(self.a(x)))))
        z = torch.relu(self.bnc(self.c(torch.relu(x + y))))
        return self.fc(z.mean((2, 3)))


def _gated():
    torch.manual_seed(0)
    net = Block().eval()
    plan = trace_plan(net, (3, 16, 16))
    return GatedModel(net, plan, [u.name for u in plan.units]).eval().set_gates("predict")


def test_ftwt_counter_credits_the_pre_add_mask_and_skips_the_gates():
    g = _gated()
    assert {u.name for u in g.units} == {"stem", "a", "b", "c"}
    ch = torch.arange(8)
    masks = {"stem": ch < 4, "a": ch < 2, "b": ch >= 4, "c": ch < 5}
    with torch.no_grad(), g.forcing({n: m[None] for n, m in masks.items()}):
        g(torch.randn(1, 3, 16, 16))
    s = g.last_stats
    hw = 16 * 16 * 9
    # FTWT: conv c reads "the previous unit's" 4 channels (b's, before the add); the classifier counts dense; no gates
    ftwt = (3 * 4 + 4 * 2 + 2 * 4 + 4 * 5) * hw + 8 * 4
    assert float(ftwt_counter_macs(g.plan.ops, g.units, s)[0]) == ftwt
    # exact: the add's stream is stem's channels 0-3 or b's 4-7, all 8, so c reads 8; the classifier reads c's 5;
    # and every gate costs active_in · C_out
    exact = (3 * 4 + 4 * 2 + 2 * 4 + 8 * 5) * hw + 5 * 4
    assert float(s.macs[0]) == exact + float(s.gate_macs[0]) and float(s.gate_macs[0]) > 0


def test_ftwt_counter_makes_masked_depthwise_convs_free():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    plan = trace_plan(net, (3, 8, 8))
    g = GatedModel(net, plan, [u.name for u in plan.units]).eval().set_gates("predict")
    masks = {u.name: torch.ones(1, u.out_channels, dtype=torch.bool) for u in g.units}
    masks["0"][0, 0] = False                    # one expansion channel off
    with torch.no_grad(), g.forcing(masks):
        g(torch.randn(1, 3, 8, 8))
    per_op = {n: float(v[0]) for n, v in g.last_stats.per_layer.items()}
    got = float(ftwt_counter_macs(g.plan.ops, g.units, g.last_stats)[0])
    # depthwise "3" counts 0 (7 // 8 = 0), so the total is everything else in FTWT's count
    assert got == pytest.approx(3 * 7 * 64 + 0 + 8 * 8 * 64 + 8 * 4)
    assert per_op["3"] > 0                       # the exact count keeps the depthwise conv's 7 channels


def test_frozen_masks_match_the_target_macs():
    g = _gated()
    rate = {"stem": torch.linspace(0, 1, 8), "a": torch.linspace(1, 0, 8), "b": torch.full((8,), 0.5),
            "c": torch.linspace(0.2, 0.9, 8)}
    with torch.no_grad():
        g.set_gates("open")
        g(torch.zeros(1, 3, 16, 16))
    dense = g.last_stats.dense_macs
    masks, macs = frozen_masks(g, rate, 0.5 * dense, (3, 16, 16))
    assert set(masks) == set(rate) and all(m.dtype == torch.bool and m.shape == (8,) for m in masks.values())
    assert abs(macs - 0.5 * dense) <= 0.15 * dense          # as close as whole channels allow
    # a channel that fires more often is kept whenever a rarer one of the same layer is
    assert masks["stem"].int().diff().min() >= 0 and masks["a"].int().diff().max() <= 0
