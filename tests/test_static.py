"""Static twins: Torch-Pruning to a MACs target, the pruning plan as JSON, rebuilt without unpickling."""
import json

import pytest
import torch
import torchvision

import ftwt_cli
from ftwt_cli.errors import FtwtError
from ftwt_cli.eval import evaluate_run
from ftwt_cli.gating.model import model_macs
from ftwt_cli.runs import load_static, make_static_run
from ftwt_cli.static import (
    PruningPlan,
    StaticOptions,
    apply_plan,
    prune_at_ratio,
    prune_to_macs,
    taylor_grads,
)
from ftwt_cli.train.config import FinetuneConfig, FitGatesConfig
from ftwt_cli.train.loops import finetune, fit_gates


def _net(name):
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10).eval()


@pytest.mark.parametrize("name, head, size", [("resnet18", "fc", (3, 16, 16)), ("mobilenet_v2", "classifier.1", (3, 32, 32))])
def test_the_plan_rebuilds_the_pruned_model_from_a_fresh_source(name, head, size):
    src = _net(name)
    pruned, plan = prune_at_ratio(src, torch.zeros(1, *size), 0.3, "l1", [head])
    plan = PruningPlan.from_dict(json.loads(json.dumps(plan.to_dict())))       # through JSON
    fresh = _net(name)
    fresh.load_state_dict(src.state_dict())
    apply_plan(fresh, plan)
    a, b = fresh.state_dict(), pruned.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, *size)
    torch.testing.assert_close(fresh(x), pruned(x))
    assert getattr(pruned, head.split(".")[0]) is not None
    out_layer = pruned.get_submodule(head)
    assert out_layer.out_features == 10                                     # the classifier keeps every class
    # kept indices are indices into the source layer, ascending and unique
    conv = next(n for n in plan.layers if "out" in plan.layers[n])
    kept = plan.layers[conv]["out"]
    assert kept == sorted(set(kept)) and max(kept) < plan.sizes[conv]["out"] and len(kept) < plan.sizes[conv]["out"]


class _TinyResNet(torch.nn.Module):
    """stem → residual block (two convs, an add) → a 1×1 widening conv → GAP → classifier."""

    def __init__(self) -> None:
        super().__init__()
        C = torch.nn.Conv2d
        self.stem, self.bn0 = C(3, 96, 3, padding=1, bias=False), torch.nn.BatchNorm2d(96)
        self.conv1, self.bn1 = C(96, 128, 3, padding=1, bias=False), torch.nn.BatchNorm2d(128)
        self.conv2, self.bn2 = C(128, 96, 3, padding=1, bias=False), torch.nn.BatchNorm2d(96)
        self.wide, self.bn3 = C(96, 160, 1, bias=False), torch.nn.BatchNorm2d(160)
        self.fc = torch.nn.Linear(160, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.relu(self.bn3(self.wide(x))).mean((2, 3)))


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor", "fpgm"])
def test_pruning_lands_within_one_percent_of_the_target_and_both_counters_agree(importance):
    torch.manual_seed(0)
    src, size = _TinyResNet().eval(), (3, 8, 8)
    dense = model_macs(src, size)
    calib = (torch.randn(16, *size), torch.randint(0, 10, (16,)))
    res = prune_to_macs(src, size, 0.55 * dense, importance, ignored=["fc"], calib=calib)
    assert res.model.fc.out_features == 10 and res.model.conv1.out_channels < 128
    assert abs(res.macs - 0.55 * dense) <= 0.01 * 0.55 * dense
    assert res.macs == model_macs(res.model, size)
    assert abs(res.tp_macs - res.macs) <= 0.01 * res.macs              # Torch-Pruning's conv + linear count


def test_an_unreachable_target_and_an_unknown_importance_are_one_line_errors():
    src, size = _TinyResNet().eval(), (3, 16, 16)
    with pytest.raises(FtwtError, match="cannot reach"):
        prune_to_macs(src, size, 1.0, "l1", ignored=["fc"])
    with pytest.raises(FtwtError, match="l1, l2, taylor, fpgm"):
        prune_to_macs(src, size, 1e6, "magic", ignored=["fc"])


def test_a_static_run_loads_trains_as_a_dense_control_and_refuses_gate_training(run, tmp_path):
    dense = ftwt_cli.load(run).dense_macs().total[0].item()
    rep = make_static_run(run, tmp_path / "static", 0.6 * dense, "l1")
    meta = json.loads((tmp_path / "static" / "ftwt.json").read_text())
    assert meta["format_version"] == 2 and meta["static"]["importance"] == "l1"
    assert meta["gating"]["gated"] == [] and meta["static"]["plan"]["layers"]
    assert not list((tmp_path / "static").glob("*.pt"))                 # weights are safetensors, never a pickle
    m = ftwt_cli.load(tmp_path / "static")
    assert abs(m.dense_macs().total[0].item() - rep.result.macs) < 1
    plain = load_static(tmp_path / "static")
    assert isinstance(plain, torchvision.models.ResNet)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(plain(x), rep.result.model(x))
    with pytest.raises(FtwtError, match="no gates"):
        fit_gates(tmp_path / "static", "digits", FitGatesConfig(epochs=1, workers=0))
    r = finetune(tmp_path / "static", "digits", FinetuneConfig(epochs=1, batch_size=64, workers=0), dense_control=True,
                 train_samples=128)
    assert r.final.mean_macs == pytest.approx(rep.result.macs)
    assert ftwt_cli.load(tmp_path / "static").meta.training["finetune"].epochs
    with pytest.raises(FtwtError, match="not a statically pruned model"):
        load_static(run)
    # an exported static model carries its plan: it loads to the same function
    from ftwt_cli.runs import export
    export(tmp_path / "static", tmp_path / "static.safetensors")
    torch.testing.assert_close(ftwt_cli.load(tmp_path / "static.safetensors")(x), ftwt_cli.load(tmp_path / "static")(x))
    # info says what it is: a static twin with its cut against the source, not "0 gated layers, 0.0% cut"
    from typer.testing import CliRunner

    from ftwt_cli.cli import app
    for path in (tmp_path / "static", tmp_path / "static.safetensors"):
        res = CliRunner().invoke(app, ["info", str(path)])
        out = " ".join(res.stdout.split())
        assert res.exit_code == 0 and "static twin" in out and "gated layers" not in out, res.output
        assert f"({1 - rep.result.macs / dense:.1%} cut); no gates" in out
        assert f"({1 - rep.result.macs / dense:.1%} cut)" in out.split("last results")[1]
    # evaluate reports its cut against the source, and no gates
    ev = evaluate_run(tmp_path / "static", "digits", gates="open", workers=0)
    assert ev.static and ev.cut_vs_source == pytest.approx(1 - rep.result.macs / dense, abs=1e-6)
    from ftwt_cli.eval.report import report_markdown
    md = report_markdown(ev)
    assert "statically pruned" in md and f"**{1 - rep.result.macs / dense:.1%}**" in md


def test_a_model_torch_pruning_cannot_trace_is_one_line_naming_the_layer():
    class Breaks(torch.nn.Module):            # what a tracing failure inside a layer looks like
        def forward(self, x):
            raise RuntimeError("unsupported op")

    net = _TinyResNet().eval()
    net.wide = torch.nn.Sequential(net.wide, Breaks())
    with pytest.raises(FtwtError, match=r"cannot trace this model at layer wide\.1 \(RuntimeError: unsupported op\)"):
        prune_at_ratio(net, torch.zeros(1, 3, 8, 8), 0.3, "l1", ["fc"])
    assert not any(m._forward_pre_hooks for m in net.modules())           # no hook left behind


def test_a_damaged_plan_is_refused():
    with pytest.raises(FtwtError):
        PruningPlan.from_dict({"layers": {"conv1": {"out": ["x"]}}})
    with pytest.raises(FtwtError):
        PruningPlan.from_dict({"layers": {}, "unknown": 1})
    with pytest.raises(FtwtError, match="does not have"):
        apply_plan(_net("resnet18"), PruningPlan("l1", {"nope": {"out": [0]}}, {"nope": {"out": 2}}))


@pytest.mark.parametrize("options", [StaticOptions(global_pruning=True), StaticOptions(True, True),
                                     StaticOptions(round_to=8), StaticOptions(True, False, 16)])
def test_the_strong_torch_pruning_settings_reach_the_target(options):
    """Global (and isomorphic) ranking and channel rounding, Torch-Pruning's strongest settings, as choices of the twin."""
    torch.manual_seed(0)
    src, size = _TinyResNet().eval(), (3, 8, 8)
    dense = model_macs(src, size)
    res = prune_to_macs(src, size, 0.5 * dense, "l1", ignored=["fc"], options=options, tol=0.02)
    assert res.model.fc.out_features == 10
    # rounding to whole blocks of channels makes the exact target unreachable: the closest try is within a block's MACs
    assert abs(res.macs - 0.5 * dense) <= (0.02 if options.round_to is None else 0.15) * 0.5 * dense
    if options.round_to:
        convs = [m for m in res.model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert all(m.out_channels % options.round_to == 0 for m in convs)
    uniform = prune_to_macs(src, size, 0.5 * dense, "l1", ignored=["fc"], tol=0.02)
    if options.global_pruning and not options.isomorphic:    # one ranking across layers: they lose different shares
        share = lambda m: [c.out_channels / o for c, o in zip((m.stem, m.conv1, m.wide), (96, 128, 160))]
        assert max(share(res.model)) - min(share(res.model)) > max(share(uniform.model)) - min(share(uniform.model))


def test_taylor_gradients_are_accumulated_once_over_the_batches():
    torch.manual_seed(0)
    src, size = _TinyResNet().eval(), (3, 8, 8)
    batches = [(torch.randn(8, *size), torch.randint(0, 10, (8,))) for _ in range(4)]
    grads = taylor_grads(src, batches)
    assert set(grads) == {n for n, _ in src.named_parameters()} and all(p.grad is None for p in src.parameters())
    a, _ = prune_at_ratio(src, torch.zeros(1, *size), 0.4, "taylor", ["fc"], batches)
    b, _ = prune_at_ratio(src, torch.zeros(1, *size), 0.4, "taylor", ["fc"], grads)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(FtwtError, match="isomorphic"):
        prune_to_macs(src, size, 1e5, "l1", ignored=["fc"], options=StaticOptions(isomorphic=True))
