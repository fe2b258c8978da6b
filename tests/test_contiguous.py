"""Channel groups made contiguous (fit-gates --group-order contiguous): an exact re-indexing of each grouped unit's
channels, so that a kept run of groups is one slice in the compact path."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision

from ftwt_cli.arch.trace import trace_plan
from ftwt_cli.fast import make_compact
from ftwt_cli.fast.compact import CompactConv
from ftwt_cli.gating.model import GatedModel
from ftwt_cli.static.permute import contiguous_groups


def _net() -> nn.Module:
    """conv(3→20) → BN → ReLU → conv(20→24) → BN → ReLU → pool → linear, BN statistics not the identity."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 20, 3, padding=1), nn.BatchNorm2d(20), nn.ReLU(),
                        nn.Conv2d(20, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return net.eval()


def _scrambled(net: nn.Module, size, group_size: int, scale: float = 1.0) -> GatedModel:
    """Gates with random weights and each unit's channels put into groups in a random order (as co-firing does)."""
    g = GatedModel(net, trace_plan(net, size), group_size=group_size).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in g.gates.parameters():
            p.normal_(0, scale)
    for gate in g.gates.values():
        gate.set_groups(gate.group_of[torch.randperm(len(gate.group_of))])
    return g


def test_reindexing_is_exact_for_the_unit_and_keeps_the_function():
    g = _scrambled(_net(), (3, 16, 16), 4)
    ref = copy.deepcopy(g)
    res = contiguous_groups(g, (3, 16, 16))
    assert set(res.permuted) == {"0", "3"} and not res.skipped
    for name, gate in g.gates.items():
        assert torch.equal(gate.group_of, torch.arange(len(gate.group_of)) // 4)      # each group one run
        assert torch.equal(gate.group_of, ref.gates[name].group_of[res.permuted[name]])
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        # the unit's own outputs (conv → BN): the same numbers, re-indexed, bit for bit
        assert torch.equal(g.backbone[:2](x), ref.backbone[:2](x)[:, res.permuted["0"]])
        # the layers reading it sum the same products in another order: float rounding only
        assert torch.allclose(g.set_gates("open")(x), ref.set_gates("open")(x), atol=1e-5)
        out, want = g.set_gates("predict")(x), ref.set_gates("predict")(x)
    assert torch.allclose(out, want, atol=1e-5)
    for name in ("0", "3"):               # the same decisions, re-indexed (the reader's gate columns moved too)
        assert torch.equal(g.last_masks[name], ref.last_masks[name][:, res.permuted[name]])
    assert 0 < float(g.last_masks["0"].float().mean()) < 1


def test_units_coupled_to_the_residual_stream_stay_in_place():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    g = _scrambled(net, (3, 32, 32), 16, 0.1)
    ref = copy.deepcopy(g)
    res = contiguous_groups(g, (3, 32, 32))
    # each block's conv1 is its own; the stem and every conv2 feed the residual stream, shared by the stage's blocks
    assert sorted(res.permuted) == sorted(f"layer{s}.{b}.conv1" for s in range(1, 5) for b in range(2))
    assert set(res.skipped) == {"conv1", *(f"layer{s}.{b}.conv2" for s in range(1, 5) for b in range(2))}
    assert all("coupled to the outputs of" in why for why in res.skipped.values())
    assert "8 of 17 grouped units" in res.describe()
    for name in res.skipped:
        assert torch.equal(g.gates[name.replace(".", "__")].group_of, ref.gates[name.replace(".", "__")].group_of)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(g.set_gates("open")(x), ref.set_gates("open")(x), atol=1e-4)


def test_mlp_hidden_units_are_reindexed_with_fc2_columns():
    from test_mlp_units import TinyViT
    net = TinyViT().eval()
    g = _scrambled(net, (3, 16, 16), 8)
    ref = copy.deepcopy(g)
    res = contiguous_groups(g, (3, 16, 16))
    assert {u.name for u in g.units if u.kind == "mlp"} <= set(res.permuted)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(g.set_gates("predict")(x), ref.set_gates("predict")(x), atol=1e-5)
        masks = g.last_masks
        assert torch.allclose(make_compact(g, calibrate=False)(x, masks), g(x), atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_compact_slices_runs_of_kept_channels_and_stays_exact(batch):
    g = _scrambled(_net(), (3, 16, 16), 4).set_gates("predict")      # forced masks apply in predict mode
    contiguous_groups(g, (3, 16, 16))
    compact = make_compact(g, calibrate=False)
    conv = compact.compact_units["0"]
    conv.strategy, conv.pad_out = "out", list(range(21))
    conv.pad_out[8] = 12                     # 8 active channels are computed as 12 (a padded count)
    run = torch.zeros(batch, 20, dtype=torch.bool)
    run[:, 4:12] = True                      # groups 1 and 2: one run, padded with the inactive channels around it
    holes = torch.zeros(batch, 20, dtype=torch.bool)
    holes[:, [0, 1, 2, 3, 12, 13, 14, 15]] = True        # groups 0 and 3: two runs, gathered
    x = torch.randn(batch, 3, 16, 16)
    for m0 in (run, holes):
        masks = {"0": m0, "3": torch.rand(batch, 24) > 0.3}
        with torch.no_grad(), g.forcing(masks):
            want = g(x)
        with torch.no_grad():
            assert torch.allclose(compact(x, masks), want, atol=1e-5)
    assert compact._shared.runs                     # contiguous groups: kept sets are checked for runs
    idx, n, start = CompactConv._indices(run[0], conv.pad_out, runs=True)
    assert (n, start) == (8, 4) and torch.equal(idx, torch.arange(4, 16))
    idx, n, start = CompactConv._indices(holes[0], conv.pad_out, runs=True)
    assert start is None and idx[:n].tolist() == [0, 1, 2, 3, 12, 13, 14, 15] and idx.numel() == 12
    idx, n, start = CompactConv._indices(run[0], conv.pad_out)        # scattered groups: always gathered
    assert start is None and idx[:n].tolist() == list(range(4, 12))


def test_scattered_groups_are_gathered_as_before():
    g = _scrambled(_net(), (3, 16, 16), 4)
    assert not make_compact(g, calibrate=False)._shared.runs


def test_fit_gates_group_order_contiguous_saves_the_reindexed_backbone(tmp_path, ckpt):
    import ftwt_cli
    from ftwt_cli.attach import attach
    from ftwt_cli.train import FitGatesConfig, fit_gates
    from test_groups import _Notes
    attach(ckpt, arch="torchvision:resnet18", input_size=(3, 16, 16), run_dir=tmp_path / "run", group_size=16)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        source = ftwt_cli.load(tmp_path / "run")(x)          # fresh gates are open: the source model
    notes = _Notes()
    fit_gates(tmp_path / "run", "digits", FitGatesConfig(r=0.8, epochs=1, batch_size=64, workers=0, calib_samples=128,
                                                         group_order="contiguous"), train_samples=128, progress=notes)
    assert any("8 of 17 grouped units re-indexed" in n for n in notes.notes), notes.notes
    g = ftwt_cli.load(tmp_path / "run")
    for s in range(1, 5):
        for b in range(2):
            order = g.gates[f"layer{s}__{b}__conv1"].group_of
            assert torch.equal(order, torch.sort(order).values)          # saved as runs
    with torch.no_grad():
        assert torch.allclose(g.set_gates("open")(x), source, atol=1e-4)     # the same function
        want = g.set_gates("predict")(x)
        assert torch.allclose(make_compact(g, calibrate=False)(x), want, atol=1e-4)
