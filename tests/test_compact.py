"""The compact path computes only kept filters and matches the masked model within 1e-4."""
import pytest
import timm
import torch
import torchvision
from helpers import no_natural_zeros
from typer.testing import CliRunner

import ftwt_cli
from ftwt_cli.arch.trace import trace_plan
from ftwt_cli.cli import app
from ftwt_cli.fast import STRATEGIES, CompactModel, make_compact
from ftwt_cli.fast.timing import bench, oracle_masks
from ftwt_cli.gating.model import GatedModel


def _gated(build, size=64):
    torch.manual_seed(0)
    m = no_natural_zeros(build()).eval()     # non-trivial BN statistics, so folding is really tested
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.running_mean.normal_(0, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    g = GatedModel(m, trace_plan(m, (3, size, size))).eval()
    for p in g.gates.parameters():            # gates that close about half the filters
        torch.nn.init.normal_(p, std=0.5)
    return g.set_gates("predict")


MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=10),
    "efficientnet_b0(timm)": lambda: timm.create_model("efficientnet_b0", num_classes=10),   # BatchNormAct2d, SE
    "resnext(timm)": lambda: timm.create_model("resnext26ts", num_classes=10),                  # grouped convs
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("batch", [1, 3])
def test_compact_matches_masked(name, batch):
    g = _gated(MODELS[name])
    c = make_compact(g, calibrate=False)
    x = torch.randn(batch, 3, 64, 64)
    with torch.no_grad():
        ref = g(x)
        for strategy in STRATEGIES:
            for u in c.compact_units.values():
                u.strategy = strategy if (u.groups == 1 or u.depthwise or strategy == "dense") else "dense"
            y = c(x)
            assert (y - ref).abs().max() <= 1e-4 * ref.abs().max(), strategy
    keep = torch.stack([m.float().mean() for m in g.last_stats.masks.values()]).mean()
    assert 0.2 < keep < 0.8                    # the test really exercised partial masks


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("batch", [1, 3])
def test_chained_and_padded_execution_stays_exact(name, batch):
    g = _gated(MODELS[name])
    c = make_compact(g, calibrate=False)
    assert len(c.chains) >= 8                  # conv1 → conv2 in every ResNet block; expand/project in MobileNetV2
    gen = torch.Generator().manual_seed(0)
    for u in c.compact_units.values():         # pad to arbitrary larger counts: the extra channels must stay zero
        u.strategy = "out" if (u.groups == 1 or u.depthwise) else "dense"
        u.pad_out = [0] + [int(torch.randint(n, u.out_channels + 1, (1,), generator=gen)) for n in range(1, u.out_channels + 1)]
        u.pad_in = [0] + [int(torch.randint(n, u.in_channels + 1, (1,), generator=gen)) for n in range(1, u.in_channels + 1)]
    for producer, consumer in c.chains.items():
        c.compact_units[producer].pad_out = c.compact_units[consumer].pad_in
    x = torch.randn(batch, 3, 64, 64)
    with torch.no_grad():
        ref = g(x)
        assert (c(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
        c.compact_units[next(iter(c.chains.values()))].strategy = "dense"   # a chained consumer may still run dense
        assert (c(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_a_pair_with_a_hidden_second_reader_is_not_chained():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16)
            self.c2, self.b2 = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16)
            self.head = torch.nn.Linear(16, 4)

        def forward(self, x):
            a = torch.relu(self.b1(self.c1(x)))
            b = torch.relu(self.b2(self.c2(a)))
            return self.head(b.mean((2, 3)) + a.amax((2, 3)))    # `a` is read again, outside the conv
    g = _gated(Net, size=32)
    c = make_compact(g, calibrate=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert c.chains == {} and torch.allclose(c(x), g(x), atol=1e-5)


def test_calibration_picks_a_strategy_per_layer_and_stays_exact():
    g = _gated(MODELS["resnet18"], size=96)
    c = make_compact(g, calibrate=True, input_size=(3, 96, 96), reps=3)
    assert set(c.strategies.values()) <= set(STRATEGIES) and len(c.strategies) == len(g.units)
    for u in c.compact_units.values():         # padding tables: a count at or above every n, within the layer
        if u.groups == 1:
            assert u.pad_out[0] == 0 and all(n <= m <= u.out_channels for n, m in enumerate(u.pad_out))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(c(x), g(x), atol=1e-4 * g(x).abs().max())


def test_replayed_masks_and_caller_model_untouched():
    g = _gated(MODELS["resnet18"])
    x = torch.randn(1, 3, 64, 64)
    masks = oracle_masks(g, x, 0.9)
    before = {k: v.clone() for k, v in g.state_dict().items()}
    c = make_compact(g, calibrate=False)
    with torch.no_grad(), g.forcing(masks):
        ref = g(x)
        assert torch.allclose(c(x, masks), ref, atol=1e-4 * ref.abs().max())
    assert all(torch.equal(before[k], v) for k, v in g.state_dict().items()) and g.mode == "predict"


def test_bench_report_and_load_compact(r18_run):
    g = ftwt_cli.load(r18_run).set_gates("predict")
    for p in g.gates.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(1, 3, 32, 32)
    rep = bench(g, x, reps=3, warmup=1, calibrate=False)
    assert [r.variant for r in rep.rows] == ["dense", "dense-folded", "masked", "compact"]
    assert rep.row("dense").macs == rep.row("dense-folded").macs > rep.row("compact").macs
    assert 0 < rep.macs_ratio < 1 and rep.latency_ratio > 0 and all(r.p90_ms >= r.p50_ms for r in rep.rows)
    c = ftwt_cli.load(r18_run, compact=True, calibrate=False)
    assert isinstance(c, CompactModel) and c.meta.arch.name == "resnet18"


@pytest.mark.integration
def test_cli_bench(r18_run):
    res = CliRunner().invoke(app, ["bench", "--run", str(r18_run), "--r", "0.9", "--reps", "2", "--warmup", "1", "--data", "digits"])
    assert res.exit_code == 0, res.output
    assert "compact" in res.stdout and "latency ratio" in res.stdout
    res = CliRunner().invoke(app, ["bench", "--run", str(r18_run)])
    assert res.exit_code == 2 and "not fitted" in res.stderr


@pytest.mark.parametrize("share", [0.0, 1.01])
def test_a_batch_whose_union_is_nearly_full_runs_dense_and_stays_exact(share, monkeypatch):
    import ftwt_cli.fast.compact as compact
    monkeypatch.setattr(compact, "BATCH_DENSE_SHARE", share)    # 0: every conv runs dense at batch > 1; 1.01: none
    g = _gated(MODELS["resnet18"])
    c = make_compact(g, calibrate=False)
    assert c.chains
    for u in c.compact_units.values():
        u.strategy = "out"
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = g(x)
        assert (c(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
        idx = c._shared.idx
        producer = next(iter(c.chains))
        assert (idx[producer] is None) == (share == 0.0)       # the dense layout went to the chained consumer
