"""ftwt sweep: dynamic points, static twins at equal MACs, the dense control; resumable, one line per bad input."""
import json

import pytest
from helpers import StopAfter
from typer.testing import CliRunner

from ftwt_cli.cli import app
from ftwt_cli.errors import FtwtError
from ftwt_cli.sweep import Point, run_sweep
from ftwt_cli.sweep.paired import mcnemar, pack, unpack, verdict
from ftwt_cli.sweep.report import pareto_front, sweep_markdown
from ftwt_cli.train.config import FinetuneConfig, FitGatesConfig

runner = CliRunner()
ATTACH = dict(arch="torchvision:resnet18", input_size=[3, 16, 16])


@pytest.mark.integration
def test_a_sweep_runs_resumes_and_keeps_finished_points_when_one_fails(ckpt, tmp_path):
    out = tmp_path / "sweep"
    kw = dict(rs=[0.9], target_cuts=[0.999], static="l1", dense_control=True, attach_options=ATTACH,
              fit_cfg=FitGatesConfig(epochs=2, batch_size=64, workers=0, calib_samples=64),
              finetune_cfg=FinetuneConfig(epochs=1, batch_size=64, workers=0), train_samples=256, device="cpu")
    with pytest.raises(KeyboardInterrupt):            # Ctrl-C after the first fit-gates epoch of the first dynamic point
        run_sweep(ckpt, "digits", out, progress=StopAfter(1), **kw)
    doc = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in doc["points"]][:2] == ["done", "pending"]
    events = []
    with pytest.raises(FtwtError, match="cannot be reached"):     # the 0.999 cut fails at the end, after the others ran
        run_sweep(ckpt, "digits", out, on_event=events.append, **kw)
    assert "dynamic-r0.9: fit-gates (resuming after epoch 1)" in events and "dense: attach" not in events
    doc = json.loads((out / "sweep.json").read_text())
    pts = {p["name"]: p for p in doc["points"]}
    assert {k: p["status"] for k, p in pts.items()} == {"dense": "done", "dynamic-r0.9": "done", "static-l1-r0.9": "done",
                                                          "dynamic-cut0.999": "failed", "static-l1-cut0.999": "failed",
                                                          "control": "done"}
    dyn, st, ctl = pts["dynamic-r0.9"], pts["static-l1-r0.9"], pts["control"]
    for p in (dyn, st, ctl, pts["dense"]):
        assert {"kind", "r", "macs_mean", "top1", "run"} <= set(p) and 0 <= p["top1"] <= 1
    assert dyn["kind"] == "dynamic" and dyn["r"] == 0.9 and dyn["macs_mean"] < pts["dense"]["macs_mean"]
    assert abs(st["macs_mean"] - dyn["macs_mean"]) <= 0.01 * dyn["macs_mean"]       # equal MACs, within 1%
    assert abs(st["tp_macs"] - st["macs_mean"]) <= 0.01 * st["macs_mean"]
    assert ctl["macs_mean"] == pts["dense"]["macs_mean"]
    assert "cannot be reached" in pts["dynamic-cut0.999"]["error"] and "Fix: pass --target-cut between" in pts["dynamic-cut0.999"]["error"]
    # every point is a run of its own; the static twin and the control were fine-tuned with the dynamic point's budget
    for name in ("dynamic-r0.9", "static-l1-r0.9", "control"):
        meta = json.loads((out / name / "ftwt.json").read_text())
        assert meta["training"]["finetune"]["config"]["epochs"] == 1
        assert meta["training"]["finetune"]["config"]["lr"] == FinetuneConfig().lr
    assert (out / "pareto.png").stat().st_size > 1000 and "Δ dynamic − static" in (out / "sweep.md").read_text()
    md = (out / "sweep.md").read_text()
    assert "McNemar" in md and "- dynamic-r0.9: use the " in md       # the paired test and the plain sentence
    assert len(unpack(dyn["correct_bits"], dyn["samples"])) == dyn["samples"] == 359
    assert sum(unpack(dyn["correct_bits"], dyn["samples"])) == round(dyn["top1"] * 359)
    # a third run re-does only what failed; with bench, finished points get their latency at batch 1 and 32
    events.clear()
    with pytest.raises(FtwtError):
        run_sweep(ckpt, "digits", out, on_event=events.append, bench=True, **kw)
    assert not any(e.startswith(("dynamic-r0.9", "static-l1-r0.9", "control", "dense")) for e in events)
    pts = {p["name"]: p for p in json.loads((out / "sweep.json").read_text())["points"]}
    assert all(pts[n]["latency_ms"] > 0 and pts[n]["latency32_ms"] > 0 for n in ("dense", "dynamic-r0.9", "static-l1-r0.9", "control"))
    assert "latency, batch 1 / 32 (ms)" in (out / "sweep.md").read_text()


def test_sweep_bad_input_is_one_line_and_writes_nothing(ckpt, tmp_path):
    out = tmp_path / "sw"
    for args, text in ((["--rs", "1.2"], "--rs value 1.2"), (["--rs", ""], "no dynamic point"), (["--rs", "a,b"], "comma-separated"),
                       (["--rs", "0.9", "--target-cuts", "1"], "--target-cuts 1.0 is outside"),
                       (["--rs", "0.9", "--static", "magic"], "'magic' is not one of"),
                       (["--rs", "0.9", "--static-global"], "no static twin is asked for"),
                       (["--rs", "0.9", "--static", "l1", "--static-isomorphic"], "isomorphic"),
                       (["--rs", "0.9", "--static", "l1", "--static-round-to", "6"], "power of two"),
                       (["--rs", "0.9", "--hybrid", "0.7"], "--epsilon 0.7 is outside (0, 0.5)")):
        res = runner.invoke(app, ["sweep", str(ckpt), "--data", "digits", "--out", str(out), *args])
        assert res.exit_code == 2 and res.output.startswith("error: ") and text in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
    assert not out.exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(FtwtError, match="holds no sweep"):
        run_sweep(ckpt, "digits", tmp_path / "mine", rs=[0.9], attach_options=ATTACH)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_hybrid_points_follow_their_dynamic_point_with_a_twin_of_their_own():
    from ftwt_cli.sweep.state import planned_points
    pts = planned_points([0.9], [0.5], "l1", True, hybrid=0.05)
    assert [(p.kind, p.name, p.twin) for p in pts] == [
        ("dense", "dense", None), ("dynamic", "dynamic-r0.9", None), ("static", "static-l1-r0.9", "dynamic-r0.9"),
        ("hybrid", "hybrid-e0.05-r0.9", "dynamic-r0.9"), ("static", "static-l1-hybrid-e0.05-r0.9", "hybrid-e0.05-r0.9"),
        ("dynamic", "dynamic-cut0.5", None), ("static", "static-l1-cut0.5", "dynamic-cut0.5"),
        ("hybrid", "hybrid-e0.05-cut0.5", "dynamic-cut0.5"),
        ("static", "static-l1-hybrid-e0.05-cut0.5", "hybrid-e0.05-cut0.5"), ("control", "control", None)]
    assert all(p.epsilon == 0.05 for p in pts if p.kind == "hybrid")


@pytest.mark.integration
def test_a_sweep_with_hybrids_forks_them_from_the_fitted_gates(ckpt, tmp_path):
    out = tmp_path / "sweep"
    events = []
    pts = run_sweep(ckpt, "digits", out, rs=[0.9], static="l1", hybrid=0.3, attach_options=ATTACH, on_event=events.append,
                    fit_cfg=FitGatesConfig(epochs=2, lr=0.05, batch_size=64, workers=0, calib_samples=128),
                    finetune_cfg=FinetuneConfig(epochs=1, batch_size=64, workers=0), train_samples=256, device="cpu")
    by = {p.name: p for p in pts}
    assert all(p.status == "done" for p in pts), [(p.name, p.error) for p in pts]
    h, hs, d = by["hybrid-e0.3-r0.9"], by["static-l1-hybrid-e0.3-r0.9"], by["dynamic-r0.9"]
    # the hybrid was made after the dynamic point's fit-gates, before its finetune
    assert events.index("hybrid-e0.3-r0.9: hybrid of dynamic-r0.9's fitted gates (epsilon 0.3)") < events.index("dynamic-r0.9: finetune")
    meta = json.loads((out / h.name / "ftwt.json").read_text())
    assert [c["command"] for c in meta["history"]][-1] == "hybrid"
    assert len(meta["training"]["finetune"]["epochs"]) == 1 and len(meta["training"]["fit-gates"]["epochs"]) == 2
    assert h.macs_mean < by["dense"].macs_mean and h.r == d.r
    assert abs(hs.macs_mean - h.macs_mean) <= 0.01 * h.macs_mean
    md = (out / "sweep.md").read_text()
    assert "- hybrid-e0.3-r0.9: use the " in md and "hybrid model" in md


def test_the_report_pairs_each_dynamic_point_with_its_static_twin():
    pts = [Point("dense", "dense", status="done", top1=0.92, macs_mean=100.0, dense_macs=100.0),
           Point("dynamic", "dynamic-r0.9", r=0.9, status="done", top1=0.91, macs_mean=60.0, dense_macs=100.0, oracle_macs=55.0,
                 oracle_top1=0.5),
           Point("static", "static-l1-r0.9", r=0.9, twin="dynamic-r0.9", importance="l1", status="done", top1=0.905,
                 macs_mean=60.3, dense_macs=100.0),
           Point("control", "control", status="done", top1=0.925, macs_mean=100.0, dense_macs=100.0)]
    md = sweep_markdown(pts)
    assert "| dynamic-r0.9 | 60.00 M / 60.30 M" not in md        # MACs are printed in M: tiny here
    assert "| dynamic-r0.9 |" in md and "+0.50 |" in md and "40.00%" in md and "-1.50" in md
    assert "standard error" not in md                            # no sample count: nothing to say
    for p in pts:
        p.samples = 10000
    md = sweep_markdown(pts)
    assert "Validation split: 10000 images" in md and "standard error of one top-1 near 92.0% is 0.27 pt" in md
    front = [p.name for p in pareto_front(pts)]
    assert front[0] == "dynamic-r0.9" and "static-l1-r0.9" not in front


def test_mcnemar_is_the_exact_binomial_test_and_bits_round_trip():
    a = [True] * 10 + [False] * 2 + [True] * 50
    b = [False] * 10 + [True] * 2 + [True] * 50
    only_a, only_b, p = mcnemar(a, b)
    assert (only_a, only_b) == (10, 2) and p == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar(a, a) == (0, 0, 1.0) and mcnemar(b, a)[2] == pytest.approx(p)
    assert mcnemar([True] * 3000 + [False] * 3000, [False] * 3000 + [True] * 3000)[2] == pytest.approx(1.0)
    bits = [bool((i * 7) % 3) for i in range(1001)]
    assert unpack(pack(bits), 1001) == tuple(bits)
    assert verdict(0.92, 0.90, 0.01, 0.5, "l1").startswith("use the dynamic model at 50% fewer MACs: +2.00 pt")
    assert verdict(0.90, 0.92, 0.01, 0.5, "l1").startswith("use the static twin (l1)")
    assert "not a significant difference" in verdict(0.905, 0.90, 0.4, 0.5, "l1")


@pytest.mark.integration
def test_a_task_aware_sweep_gives_each_dynamic_point_its_own_budget(ckpt, tmp_path):
    out = tmp_path / "sweep"
    pts = run_sweep(ckpt, "digits", out, target_cuts=[0.4], static="l1", attach_options=ATTACH,
                    fit_cfg=FitGatesConfig(epochs=1, lr=0.05, batch_size=64, workers=0, calib_samples=128),
                    finetune_cfg=FinetuneConfig(epochs=1, batch_size=64, workers=0, task_aware=True),
                    train_samples=256, device="cpu")
    assert all(p.status == "done" for p in pts), [(p.name, p.error) for p in pts]
    saved = {p.name: json.loads((out / p.name / "ftwt.json").read_text())["training"]["finetune"]["config"]
             for p in pts if p.kind != "dense"}
    dyn = saved["dynamic-cut0.4"]
    assert dyn["task_aware"] and dyn["target_cut"] == 0.4 and dyn["bce_weight"] == 0.0
    assert saved["static-l1-cut0.4"]["target_cut"] is None          # the twin trains with every gate open, no budget
