"""Gates of channel groups (attach --group-size): one decision per group, ground truth and MACs per group, channels
ordered into groups that fire together, and the run that records it."""
import pytest
import torch
import torch.nn as nn
from helpers import MacsMeter, one_line_error
from typer.testing import CliRunner

import ftwt_cli
from ftwt_cli.arch.trace import trace_plan
from ftwt_cli.attach import attach
from ftwt_cli.cli import app
from ftwt_cli.errors import FtwtError
from ftwt_cli.gating.cofire import CofiringStats, cofiring_groups
from ftwt_cli.gating.gate import Gate
from ftwt_cli.gating.model import GatedModel
from ftwt_cli.runtime.device import resolve_precision
from ftwt_cli.train.groups import order_groups

runner = CliRunner()


def _net() -> nn.Module:
    """conv(3→20) → BN → ReLU → conv(20→24) → BN → ReLU → pool → linear: 20 = 16 + a short group of 4."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 20, 3, padding=1), nn.BatchNorm2d(20), nn.ReLU(),
                        nn.Conv2d(20, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5))
    return net.eval()


def _gated(group_size: int) -> GatedModel:
    net = _net()
    g = GatedModel(net, trace_plan(net, (3, 16, 16)), group_size=group_size).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in g.gates.parameters():
            p.normal_(0, 1.0)
    return g


def test_a_group_decides_for_all_its_channels_and_the_gate_costs_per_group():
    g = _gated(16).set_gates("predict")
    gate = g.gates["0"]
    assert gate.groups == 2 and torch.bincount(gate.group_of).tolist() == [16, 4]    # the last group is short
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        g(x)
    for name, m in g.last_masks.items():
        group_of = g.gates[name].group_of
        for j in range(int(group_of.max()) + 1):
            col = m[:, group_of == j]
            assert bool((col == col[:, :1]).all())
    assert 0 < float(torch.cat(list(g.last_masks.values()), 1).float().mean()) < 1      # some groups off, some on
    s = g.last_stats
    # gates: GAP → Linear(C_in → groups): 3·2 + (active inputs of conv 3)·2
    assert torch.equal(s.gate_macs, (3 * 2 + g.last_masks["0"].sum(1) * 2).double())
    assert torch.equal(s.macs, MacsMeter(g).run(x))      # hooks that see what each layer reads and writes
    assert g.gate_macs_dense() == 3 * 2 + 20 * 2


def test_the_ground_truth_ranks_groups_by_their_summed_scores():
    g = _gated(4)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad(), g.collecting():
        g.set_gates("predict")(x)
    scores, targets = g.last_scores, g.last_targets
    gate = g.gates["3"]
    from ftwt_cli.gating.targets import ground_truth
    want = gate.channels(ground_truth(gate.group_scores(scores["3"]), g.r, g.gt))
    assert torch.equal(targets["3"], want)
    # group scores are the members' sums: a group's share of the heatmap mass
    assert torch.allclose(gate.group_scores(scores["3"]), scores["3"].view(5, 6, 4).sum(2))
    with torch.no_grad():
        g.set_gates("oracle", r=0.8)(x)
    m = g.last_masks["3"]
    assert torch.equal(m.view(5, 6, 4), m.view(5, 6, 4)[:, :, :1].expand(5, 6, 4))


def test_cofiring_groups_put_channels_that_fire_together_in_one_group():
    # 8 channels, two patterns interleaved: even channels fire on the first half of the images, odd on the second
    n = 40
    f = torch.zeros(n, 8, dtype=torch.bool)
    f[: n // 2, 0::2] = True
    f[n // 2:, 1::2] = True
    f[0, 7] = True                                   # channel 7 fires once more: the seed of the first group
    stats = CofiringStats()
    stats.add({"u": f[:25]})
    stats.add({"u": f[25:]})                          # sums over batches equal one pass
    assert stats.images == n
    group_of = cofiring_groups(stats.agreement("u"), stats.fires["u"], torch.arange(8) // 4)
    assert group_of.tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    # sizes are kept, including a short last group
    g3 = cofiring_groups(stats.agreement("u"), stats.fires["u"], torch.tensor([0, 0, 0, 1, 1, 1, 2, 2]))
    assert torch.bincount(g3).tolist() == [3, 3, 2]
    gate = Gate(4, 8, group_size=4)
    with pytest.raises(ValueError):
        gate.set_groups(torch.tensor([0, 0, 0, 1, 1, 1, 1, 1]))


def test_ordering_groups_leaves_the_open_model_unchanged_and_raises_purity():
    g = _gated(4)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        before = g.set_gates("open")(x)
    batches = [(torch.randn(16, 3, 16, 16), None) for _ in range(2)]
    p0, p1 = order_groups(g, batches, 0.9, "mass", resolve_precision("cpu", "off"))
    assert p1 >= p0 and g.mode == "open"
    with torch.no_grad():
        assert torch.equal(g(x), before)               # nothing in the backbone moved
    assert sorted(torch.bincount(g.gates["0"].group_of).tolist()) == [4] * 5


def test_attach_records_the_group_size_and_load_rebuilds_it(tmp_path, ckpt):
    rep = attach(ckpt, arch="torchvision:resnet18", input_size=(3, 16, 16), run_dir=tmp_path / "run", group_size=24)
    assert rep.short_groups["conv1"] == 64 % 24 and rep.gate_macs < attach(
        ckpt, arch="torchvision:resnet18", input_size=(3, 16, 16), run_dir=tmp_path / "dense").gate_macs
    g = ftwt_cli.load(tmp_path / "run")
    assert g.group_size == 24 and g.meta.gating.group_size == 24 and g.gates["conv1"].groups == 3
    assert "group_size" not in (tmp_path / "dense" / "ftwt.json").read_text()     # ungrouped runs read as before


def test_group_size_zero_is_one_line(tmp_path, ckpt):
    res = runner.invoke(app, ["attach", str(ckpt), "--arch", "torchvision:resnet18", "--group-size", "0",
                              "--run", str(tmp_path / "run")])
    one_line_error(res, "--group-size")
    assert not (tmp_path / "run").exists()
    with pytest.raises(FtwtError):
        GatedModel(_net(), trace_plan(_net(), (3, 16, 16)), group_size=0)


class _Notes:
    def __init__(self) -> None:
        self.notes = []

    def start(self, *a) -> None: ...

    def step(self, *a) -> None: ...

    def validating(self) -> None: ...

    def end(self, *a) -> None: ...

    def note(self, text) -> None:
        self.notes.append(text)


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_a_grouped_run_fits_compacts_and_exports(tmp_path, ckpt):
    import numpy as np
    import onnxruntime as ort

    from ftwt_cli.fast import make_compact
    from ftwt_cli.runs.onnx import export_onnx
    from ftwt_cli.train import FitGatesConfig, fit_gates
    attach(ckpt, arch="torchvision:resnet18", input_size=(3, 16, 16), run_dir=tmp_path / "run", group_size=16)
    notes = _Notes()
    fit_gates(tmp_path / "run", "digits", FitGatesConfig(r=0.8, epochs=1, lr=0.05, batch_size=64, workers=0,
                                                         calib_samples=128), train_samples=256, progress=notes)
    assert any("ordered by co-firing" in n for n in notes.notes)
    g = ftwt_cli.load(tmp_path / "run")
    orders = [gate.group_of for gate in g.gates.values()]
    assert any(not torch.equal(o, torch.arange(len(o)) // 16) for o in orders)     # the saved co-firing order
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        want = g(x)
    assert float(g.last_stats.macs.mean()) < g.last_stats.dense_macs
    with torch.no_grad():
        assert torch.allclose(make_compact(g, calibrate=False)(x), want, atol=1e-4)
    from ftwt_cli.runs import export
    export(tmp_path / "run", tmp_path / "m.safetensors")            # the exported file carries the groups too
    with torch.no_grad():
        assert torch.equal(ftwt_cli.load(tmp_path / "m.safetensors")(x), want)
    export_onnx(tmp_path / "run", tmp_path / "m.onnx")
    s = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(s.run(None, {"image": x.numpy()})[0] - want.numpy()).max() <= 1e-4
    # a second fit-gates (the gates are fitted) keeps the groups the gates learned with
    fit_gates(tmp_path / "run", "digits", FitGatesConfig(r=0.8, epochs=1, lr=0.05, batch_size=64, workers=0),
              train_samples=128, progress=notes)
    assert all(torch.equal(a, gate.group_of) for a, gate in zip(orders, ftwt_cli.load(tmp_path / "run").gates.values()))


def test_calibration_at_each_layers_own_keep_ratio_stays_exact():
    from ftwt_cli.fast import make_compact
    g = _gated(1).set_gates("predict")
    compact = make_compact(g, keep={"0": 0.25, "3": 0.9}, reps=3)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(compact(x), g(x), atol=1e-5)
    assert set(compact.strategies) == {"0", "3"}
