"""Many processes through torchrun, on the CPU with gloo (CI has no GPU): the documented commands as written, one
DDP model whose gradients are all-reduced, rank 0 alone writing, and exact distributed evaluation."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision

import ftwt_cli
from ftwt_cli.attach import attach
from ftwt_cli.eval import evaluate_run
from ftwt_cli.formats import read_meta
from ftwt_cli.gating import gate_key

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
# random-init checkpoints are at chance by construction: the first-data check of the source is off for them
FIT = ["--data", "digits", "--epochs", "1", "--train-samples", "256", "--workers", "0", "--r", "0.9", "--lr", "0.05",
       "--no-source-check"]


def torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N --no-python ftwt -- ARGS``: the documented form."""
    p = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(n), "--no-python",
                        str(BIN / "ftwt"), "--", *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def _two_runs(tmp_path, **options):
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pth")
    out = []
    for name in ("two", "one"):       # without augmentation, so that one and two processes see the same images
        attach(tmp_path / "r18.pth", arch="torchvision:resnet18", input_size=(3, 16, 16), augment="none",
               run_dir=tmp_path / name, **options)
        out.append(tmp_path / name)
    return out


@pytest.fixture
def runs(tmp_path):
    return _two_runs(tmp_path)


def test_two_processes_fit_like_one_with_the_same_global_batch(runs):
    two, one = runs
    p = torchrun(2, "fit-gates", "--run", str(two), "--batch-size", "32", *FIT)
    assert p.stdout.count("gates fitted at r=0.9") == 1                    # rank 0 alone prints
    torchrun(1, "fit-gates", "--run", str(one), "--batch-size", "64", *FIT)
    a, b = ftwt_cli.load(two).state_dict(), ftwt_cli.load(one).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-3) for k in a if k.startswith("gates."))
    assert any(not torch.equal(a[k], torch.full_like(a[k], 3.0)) for k in a if k.endswith("fc.bias"))  # they learned
    files = read_meta(two).files
    assert {q.name for q in two.iterdir()} == {"ftwt.json", "metrics.jsonl", files.weights, files.checkpoint}
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 1


def test_grouped_gates_fit_under_torchrun_like_one_process(tmp_path):
    """Gates of channel groups (attach --group-size 8): the group map is a buffer, the logits per group; two ranks
    with half the batch each end where one process with the whole batch ends, and the groups' masks decide."""
    two, one = _two_runs(tmp_path, group_size=8)
    torchrun(2, "fit-gates", "--run", str(two), "--batch-size", "32", *FIT)
    torchrun(1, "fit-gates", "--run", str(one), "--batch-size", "64", *FIT)
    a, b = ftwt_cli.load(two), ftwt_cli.load(one)
    sa, sb = a.state_dict(), b.state_dict()
    assert any(k.endswith("group_of") for k in sa)
    assert all(torch.allclose(sa[k], sb[k], atol=1e-3) for k in sa if k.startswith("gates."))
    a.eval()(torch.randn(4, 3, 16, 16))
    for name, m in a.last_stats.masks.items():    # channels of one group (fit-gates regroups them) fire together
        group_of = a.gates[gate_key(name)].group_of
        for g in group_of.unique():
            cols = m[:, group_of == g]
            assert bool((cols.all(1) | ~cols.any(1)).all()), name


def test_ranks_hold_the_same_weights_after_finetune_with_frozen_gates(runs, tmp_path):
    two, _ = runs
    torchrun(2, "fit-gates", "--run", str(two), "--batch-size", "32", *FIT)
    script = tmp_path / "ft.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch
        from ftwt_cli.train import FinetuneConfig, finetune
        rep = finetune({str(two)!r}, "digits", FinetuneConfig(epochs=2, batch_size=32, workers=0, freeze_gates_at=0.5),
                       train_samples=256, check_source=False)
        torch.save(rep.model.state_dict(), {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
    """))
    p = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(script)], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0), [k for k in r0 if not torch.equal(r0[k], r1[k])][:5]
    saved = ftwt_cli.load(two).state_dict()
    assert all(torch.equal(r0[k], saved[k]) for k in r0), [k for k in r0 if not torch.equal(r0[k], saved[k])][:5]


def test_distributed_evaluation_counts_every_image_once(runs):
    two, _ = runs
    torchrun(2, "fit-gates", "--run", str(two), "--batch-size", "32", *FIT)
    torchrun(2, "evaluate", "--run", str(two), "--data", "digits", "--workers", "0", "--no-source-check")     # 359 images: odd
    dist = json.loads((two / "report.json").read_text())
    single = evaluate_run(two, "digits", workers=0)
    assert dist["samples"] == single.samples == 359
    assert dist["top1"] == single.top1 and dist["top1_open"] == single.top1_open
    assert dist["macs_mean"] == pytest.approx(single.macs_mean, rel=1e-12)
    assert dist["macs_p50"] == pytest.approx(single.macs_p50, rel=1e-12)


def test_resume_under_torchrun_ends_where_an_uninterrupted_run_ends(runs, tmp_path):
    two, one = runs                      # both start from the same attached run; `one` serves as the interrupted copy
    script = tmp_path / "fit.py"
    script.write_text(textwrap.dedent("""
        import sys
        import ftwt_cli.train.phase as phase
        from ftwt_cli.train import FitGatesConfig, fit_gates
        cfg = FitGatesConfig(r=0.9, epochs=2, lr=0.05, batch_size=32, workers=0)
        if sys.argv[2] == "interrupt":           # Ctrl-C reaches every process once epoch 1 is committed
            barrier = phase.barrier
            def interrupted(d):
                barrier(d)
                raise KeyboardInterrupt
            phase.barrier = interrupted
            try:
                fit_gates(sys.argv[1], "digits", cfg, train_samples=256, check_source=False)
            except KeyboardInterrupt:
                pass
        else:
            fit_gates(sys.argv[1], "digits", None if sys.argv[2] == "resume" else cfg, train_samples=256,
                      resume=sys.argv[2] == "resume", check_source=False)
    """))

    def launch(run, how):
        p = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(script), str(run), how],
                           env=ENV, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    launch(two, "full")
    launch(one, "interrupt")
    assert len(read_meta(one).training["fit-gates"].epochs) == 1
    launch(one, "resume")
    a, b = ftwt_cli.load(two).state_dict(), ftwt_cli.load(one).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_sweep_under_torchrun_matches_its_points_and_rank_0_alone_writes(tmp_path):
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pth")
    out = tmp_path / "sw"
    (tmp_path / "fast.yaml").write_text("fit_gates: {lr: 0.05, batch_size: 32}\nfinetune: {batch_size: 32}\n")
    p = torchrun(2, "sweep", str(tmp_path / "r18.pth"), "--data", "digits", "--rs", "0.9", "--target-cuts", "0.5",
                 "--recipe", str(tmp_path / "fast.yaml"),
                 "--static", "l1", "--fit-epochs", "2", "--finetune-epochs", "1", "--train-samples", "256", "--workers", "0",
                 "--calib-samples", "128", "--device", "cpu", "--arch", "torchvision:resnet18", "--input-size", "3,16,16",
                 "--no-source-check",
                 "--out", str(out))
    assert p.stdout.count("wrote sweep.json") == 1
    pts = {q["name"]: q for q in json.loads((out / "sweep.json").read_text())["points"]}
    assert all(q["status"] == "done" for q in pts.values()), pts
    for name in ("dynamic-r0.9", "dynamic-cut0.5"):
        assert abs(pts[f"static-l1-{name[8:]}"]["macs_mean"] - pts[name]["macs_mean"]) <= 0.01 * pts[name]["macs_mean"]
    # the distributed evaluation the sweep recorded is the single-process one
    single = evaluate_run(out / "dynamic-r0.9", "digits", device="cpu")
    assert single.top1 == pts["dynamic-r0.9"]["top1"] and single.macs_mean == pytest.approx(pts["dynamic-r0.9"]["macs_mean"])
    assert {q.name for q in out.iterdir()} == {"sweep.json", "sweep.md", "pareto.png", "dense", "dynamic-r0.9",
                                               "static-l1-r0.9", "dynamic-cut0.5", "static-l1-cut0.5"}
