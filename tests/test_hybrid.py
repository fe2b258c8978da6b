"""The hybrid model (ftwt hybrid): channels that (nearly) never fire removed physically, those that (nearly) always
fire ungated, gates kept only where decisions vary; the same function as the gated model with those masks."""
import pytest
import torch
from helpers import one_line_error
from typer.testing import CliRunner

import ftwt_cli
from ftwt_cli.cli import app
from ftwt_cli.errors import FtwtError
from ftwt_cli.formats.rundir import read_meta
from ftwt_cli.gating.gate import OPEN_LOGIT, Gate, gate_key
from ftwt_cli.runs.bench import bench_run
from ftwt_cli.runs.hybrid import make_hybrid_run, split_channels

runner = CliRunner()


def test_gate_leaves_fixed_channels_open_and_out_of_its_groups():
    torch.manual_seed(0)
    g = Gate(4, 6, fixed_open=2)
    assert g.groups == 4 and g.fixed_open == 2 and g.group_of.tolist() == [0, 1, 2, 3, 4, 4]
    with torch.no_grad():
        g.fc.weight.normal_()
    g.set_groups(torch.tensor([4, 0, 1, 4, 2, 3]))          # channels 0 and 3 without a gate
    logits = g(torch.randn(3, 4, 5, 5))
    assert logits.shape == (3, 6)
    assert torch.all(logits[:, [0, 3]] == OPEN_LOGIT)
    assert torch.equal(g.channels(torch.zeros(3, 4, dtype=torch.bool))[:, [0, 3]], torch.ones(3, 2, dtype=torch.bool))
    scores = torch.arange(6.0).expand(2, 6)
    assert g.group_scores(scores).tolist() == [[1.0, 2.0, 4.0, 5.0]] * 2      # the fixed channels 0 and 3 not ranked
    with pytest.raises(ValueError):
        Gate(4, 3, fixed_open=3)                        # a gate must decide something


def test_split_channels_keeps_a_channel_per_layer():
    dead, fixed = split_channels(torch.tensor([0.0, 0.02, 0.5, 0.97, 1.0]), 0.05)
    assert dead.tolist() == [True, True, False, False, False] and fixed.tolist() == [False, False, False, True, True]
    dead, _ = split_channels(torch.tensor([0.01, 0.03, 0.0]), 0.05)
    assert dead.tolist() == [True, False, True]          # all below ε: the most frequent one stays


@pytest.fixture(scope="module")
def hybrid(fitted, tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid") / "h"
    rep = make_hybrid_run(fitted, "digits", out, epsilon=0.3, images=256, workers=0)
    return rep


def test_hybrid_computes_what_the_gated_model_computes_with_those_masks(fitted, hybrid):
    """The pruned, partly ungated model is exactly the source gated model with the removed channels masked off,
    the ungated ones on and the rest as the hybrid's gates decide; its gates are the source gates' rows and columns."""
    assert hybrid.removed > 0 and hybrid.fixed > 0 and hybrid.varying > 0
    assert hybrid.removed + hybrid.fixed + hybrid.varying == hybrid.channels
    src, hy = ftwt_cli.load(fitted).set_gates("predict"), ftwt_cli.load(hybrid.run_dir)
    assert hy.mode == "predict" and hy.meta.gating.fixed_open
    plan = hy.meta.static.plan["layers"]
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        out_h = hy(x)
        forced = {}
        for u in src.units:
            kept = plan.get(u.name, {}).get("out", list(range(u.out_channels)))
            m = torch.zeros(4, u.out_channels, dtype=torch.bool)
            m[:, kept] = hy.last_masks[u.name] if u.name in hy.gated_names else True
            forced[u.name] = m
        with src.forcing(forced):
            out_s = src(x)
    torch.testing.assert_close(out_h, out_s, rtol=1e-4, atol=1e-4)
    for u in hy.units:
        kept = plan.get(u.name, {}).get("out", list(range(u.out_channels)))
        gate = hy.gates[gate_key(u.name)]
        ungated = gate.group_of == gate.groups if gate.group_of is not None else torch.zeros(len(kept), dtype=torch.bool)
        lh, ls = hy.last_logits[u.name], src.last_logits[u.name][:, kept]
        assert torch.all(lh[:, ungated] == OPEN_LOGIT)
        torch.testing.assert_close(lh[:, ~ungated], ls[:, ~ungated], rtol=1e-4, atol=1e-4)


@pytest.mark.integration      # times three variants, twice, and the CLI: ~6 s
def test_bench_times_a_hybrid_against_its_unpruned_source(hybrid):
    rep = bench_run(hybrid.run_dir, reps=2, warmup=1)
    src = rep.row("source-dense-folded")
    assert src.macs == pytest.approx(hybrid.source_macs) and src.macs > rep.row("dense").macs > rep.row("compact").macs
    assert src.p90_ms >= src.p50_ms > 0
    assert "source-dense-folded" not in [r.variant for r in bench_run(hybrid.run_dir, reps=1, warmup=0, with_source=False).rows]
    res = runner.invoke(app, ["bench", "--run", str(hybrid.run_dir), "--reps", "2", "--warmup", "1"])
    assert res.exit_code == 0, res.output
    assert "compact against the unpruned source architecture" in " ".join(res.stdout.split())


def test_hybrid_is_smaller_and_counts_its_gates(fitted, hybrid):
    src, hy = ftwt_cli.load(fitted), ftwt_cli.load(hybrid.run_dir)
    assert hybrid.dense_macs < hybrid.source_macs == pytest.approx(float(src.dense_macs().total[0]))
    assert sum(p.numel() for p in hy.backbone.parameters()) < sum(p.numel() for p in src.backbone.parameters())
    assert hy.gate_macs_dense() == sum(u.in_channels * hy.gates[gate_key(u.name)].groups for u in hy.units)
    assert hy.gate_macs_dense() < src.gate_macs_dense()
    meta = read_meta(hybrid.run_dir)
    assert meta.format_version == 2 and meta.history[-1]["command"] == "hybrid"


@pytest.mark.integration      # fine-tunes, exports and builds the ONNX graph: ~8 s
def test_hybrid_fine_tunes_and_exports(hybrid, tmp_path):
    from ftwt_cli.runs.exporter import export
    from ftwt_cli.train import FinetuneConfig, finetune
    rep = finetune(hybrid.run_dir, "digits", FinetuneConfig(epochs=1, batch_size=64, workers=0, lr=0.01), device="cpu")
    assert 0.0 <= rep.final.top1 <= 1.0 and rep.final.reduction > 0
    f = export(hybrid.run_dir, tmp_path / "h.safetensors").path
    a, b = ftwt_cli.load(hybrid.run_dir), ftwt_cli.load(f)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    assert b.meta.gating.fixed_open == a.meta.gating.fixed_open
    # the compact path (only the kept filters computed) and the ONNX graph compute the same function
    import numpy as np
    import onnxruntime as ort

    from ftwt_cli.runs.onnx import export_onnx
    c = ftwt_cli.load(hybrid.run_dir, compact=True, calibrate=False)
    with torch.no_grad():
        want = a(x)
        torch.testing.assert_close(c(x), want, rtol=1e-4, atol=1e-4)
    path = export_onnx(hybrid.run_dir, tmp_path / "h.onnx").path
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert np.abs(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0] - want.numpy()).max() <= 1e-4


@pytest.mark.parametrize("eps", ["0", "0.5", "-1"])
def test_epsilon_outside_range_is_one_line_and_writes_nothing(fitted, tmp_path, eps):
    res = runner.invoke(app, ["hybrid", "--run", str(fitted), "--data", "digits", "--epsilon", eps, "--out", str(tmp_path / "h")])
    one_line_error(res, "--epsilon")
    assert not (tmp_path / "h").exists()


def test_hybrid_needs_fitted_gates(run, tmp_path):
    with pytest.raises(FtwtError, match="no fitted gates"):
        make_hybrid_run(run, "digits", tmp_path / "h", epsilon=0.05, images=64, workers=0)
    assert not (tmp_path / "h").exists()


def test_hybrid_of_a_hybrid_is_refused(hybrid, tmp_path):
    res = runner.invoke(app, ["hybrid", "--run", str(hybrid.run_dir), "--data", "digits", "--out", str(tmp_path / "h")])
    one_line_error(res, "already pruned")
    assert not (tmp_path / "h").exists()
