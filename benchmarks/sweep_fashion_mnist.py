"""Dynamic against static pruning at equal MACs: `ftwt sweep` on the Fashion-MNIST ResNet-18 setting of RESULTS.md.

For each seed: `ftwt sweep` with the recipe (fit-gates 2 epochs, finetune 4 epochs), r ∈ {0.95, 0.92, 0.9, 0.86},
each dynamic point's static twin (Torch-Pruning, L1 filter norms, pruned to the point's mean MACs, fine-tuned with
the same budget) and the dense control. Then benchmarks/results/sweep_fashion_mnist.md: the per-seed tables, Δ top-1 of dynamic against
static per point, and the plot of the first seed (benchmarks/results/sweep-fashion-mnist.png), into benchmarks/results/sweep_fashion_mnist.md.

    python benchmarks/sweep_fashion_mnist.py [--seeds 0,1] [--rs 0.95,0.92,0.9,0.86] [--static l1]
        [--importance-check 0.9]    # also the static twins by taylor and fpgm at r = 0.9 (first seed)

The 15-epoch baseline is benchmarks/fashion_mnist.py's (trained here if missing, seeded). Sweeps resume: re-running
the command skips finished points.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from ftwt_cli.formats.rundir import atomic_write_text

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
MEAN, STD = "0.286,0.286,0.286", "0.353,0.353,0.353"


def baseline(epochs: int) -> Path:
    ckpt = WORK / f"resnet18-fashion-mnist-b{epochs}.pth"
    if not ckpt.exists():
        from fashion_mnist import train_baseline
        torch.manual_seed(0)
        train_baseline(ckpt, epochs, 2)
    return ckpt


def sweep(ckpt: Path, out: Path, rs: str, seed: int, static: str, workers: int, extra=(),
          arch: str = "torchvision:resnet18") -> list:
    cmd = [sys.executable, "-m", "ftwt_cli", "sweep", str(ckpt), "--recipe", str(HERE.parent / "recipes" / "resnet18-fashion-mnist.yaml"),
           "--rs", rs, "--static", static, "--dense-control", "--seed", str(seed), "--workers", str(workers), "--device", "cpu",
           "--arch", arch, "--input-size", "3,32,32", "--mean", MEAN, "--std", STD, "--out", str(out), *extra]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=False)
    return json.loads((out / "sweep.json").read_text())["points"]


def table(points: list, importance: str) -> list:
    by = {p["name"]: p for p in points}
    ctl = by.get("control")
    lines = ["| r | dynamic: MACs cut / top-1 | oracle cut | static twin: MACs cut / top-1 | Δ dynamic − static (pt) | Δ dynamic − control (pt) |",
             "|---|---|---|---|---|---|"]
    for p in points:
        if p["kind"] != "dynamic" or p["top1"] is None:
            continue
        st = next((q for q in points if q["kind"] == "static" and q["twin"] == p["name"] and q["top1"] is not None
                   and q["importance"] == importance), None)
        oracle = 1 - p["oracle_macs"] / p["dense_macs"] if p.get("oracle_macs") else None
        lines.append(f"| {p['r']:g} | {p['cut']:.1%} / {p['top1']:.2%} | {'–' if oracle is None else f'{oracle:.1%}'} | "
                     + (f"{st['cut']:.1%} / {st['top1']:.2%} | **{(p['top1'] - st['top1']) * 100:+.2f}** | " if st else "– | – | ")
                     + (f"{(p['top1'] - ctl['top1']) * 100:+.2f} |" if ctl and ctl["top1"] is not None else "– |"))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-epochs", type=int, default=15)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--rs", default="0.95,0.92,0.9,0.86")
    ap.add_argument("--static", default="l1")
    ap.add_argument("--importance-check", type=float, default=None, help="also taylor and fpgm twins at this r (first seed)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (2: as RESULTS.md; 0 makes each epoch ~2× slower here)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the results file from the finished sweeps")
    ap.add_argument("--out", default=str(HERE / "results" / "sweep_fashion_mnist.md"))
    args = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    ckpt = baseline(args.baseline_epochs)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    results = {}
    for seed in seeds:
        out = WORK / f"sweep-resnet18-b{args.baseline_epochs}-s{seed}"
        if args.report_only:
            results[seed] = json.loads((out / "sweep.json").read_text())["points"] if (out / "sweep.json").exists() else []
            continue
        t0 = time.time()
        results[seed] = sweep(ckpt, out, args.rs, seed, args.static, args.workers)
        print(f"seed {seed}: {time.time() - t0:.0f} s", flush=True)
    checks = {}
    if args.importance_check is not None:
        # the same sweep folder: its finished dynamic point and control are reused, only the new twin is trained
        out = WORK / f"sweep-resnet18-b{args.baseline_epochs}-s{seeds[0]}"
        for imp in ("taylor", "fpgm"):
            pts = (json.loads((out / "sweep.json").read_text())["points"] if args.report_only
                   else sweep(ckpt, out, f"{args.importance_check:g}", seeds[0], imp, args.workers))
            checks[imp] = [p for p in pts if p["name"] == f"static-{imp}-r{args.importance_check:g}"]
        results[seeds[0]] = json.loads((out / "sweep.json").read_text())["points"]

    first = WORK / f"sweep-resnet18-b{args.baseline_epochs}-s{seeds[0]}" / "pareto.png"
    if first.exists():
        shutil.copyfile(first, Path(args.out).with_name("sweep-fashion-mnist.png"))
    lines = ["# Dynamic (FTWT) against static (Torch-Pruning) pruning at equal MACs", "",
             f"Generated by `python benchmarks/sweep_fashion_mnist.py` on {platform.machine()}, {os.cpu_count()} CPU threads, "
             f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.", "",
             f"* Source: the {args.baseline_epochs}-epoch torchvision ResNet-18 of [RESULTS.md](../RESULTS.md) (Fashion-MNIST, 32 px).",
             "* Each seed is one `ftwt sweep` with `recipes/resnet18-fashion-mnist.yaml`: per r, `fit-gates` (2 epochs) then "
             "`finetune` (4 epochs, SGD 0.01 cosine, decoupled); the static twin is the source pruned by Torch-Pruning "
             f"({args.static.upper()} filter norms, every layer at one ratio, classifier outputs kept) to the dynamic point's "
             "mean MACs, then fine-tuned with the same 4 epochs, learning rate, schedule, batch size and augmentation; the dense "
             "control gets the same 4 epochs with every gate open. The seed sets data order and augmentation for every point.",
             "* MACs are ftwt's exact per-sample counts on the 10k test split (dynamic: gates included); cut is against the "
             "dense model. The static twins' MACs agree with Torch-Pruning's own count of their conv and linear layers.",
             "* Top-1 on the 10k test split; its standard error near 92% is about 0.27 pt.", ""]
    for seed, pts in results.items():
        if not pts:
            continue
        by = {p["name"]: p for p in pts}
        pts = [p for p in pts if p["kind"] != "static" or p["importance"] == args.static]
        ctl = by.get("control", {}).get("top1")
        lines += [f"## Seed {seed}", "",
                  f"Dense source: top-1 {by['dense']['top1']:.2%} at {by['dense']['macs_mean'] / 1e6:.2f} M MACs; dense control "
                  + (f"(4 epochs): {ctl:.2%}." if ctl is not None else "not run yet."), "",
                  *table(pts, args.static), "",
                  "Points not finished: " + (", ".join(p["name"] for p in pts if p["status"] != "done") or "none") + ".", ""]
    both = [s for s in results if results[s]]
    if len(both) > 1:
        lines += ["## Mean over seeds", "", "| r | mean MACs cut (dynamic / static) | mean Δ dynamic − static (pt) | per seed |", "|---|---|---|---|"]
        rs = [float(r) for r in args.rs.split(",")]
        for r in rs:
            ds = []
            for s in both:
                by = {p["name"]: p for p in results[s]}
                d = by.get(f"dynamic-r{r:g}")
                st = by.get(f"static-{args.static}-r{r:g}")
                if d and st and d["top1"] is not None and st["top1"] is not None:
                    ds.append((d["cut"], st["cut"], (d["top1"] - st["top1"]) * 100))
            if ds:
                lines.append(f"| {r:g} | {sum(x[0] for x in ds) / len(ds):.1%} / {sum(x[1] for x in ds) / len(ds):.1%} | "
                             f"**{sum(x[2] for x in ds) / len(ds):+.2f}** | {', '.join(f'{x[2]:+.2f}' for x in ds)} |")
        lines.append("")
    if checks:
        lines += [f"## Static importance at r = {args.importance_check:g} (seed {seeds[0]})", "",
                  "| importance | static MACs cut | static top-1 |", "|---|---|---|"]
        base = {p["name"]: p for p in results.get(seeds[0], [])}.get(f"static-{args.static}-r{args.importance_check:g}")
        rows = ([(args.static, base)] if base else []) + [
            (imp, next((p for p in pts if p["kind"] == "static"), None)) for imp, pts in checks.items()]
        for imp, p in rows:
            if p and p["top1"] is not None:
                lines.append(f"| {imp} | {p['cut']:.1%} | {p['top1']:.2%} |")
        lines.append("")
    if Path(args.out).with_name("sweep-fashion-mnist.png").exists():
        lines += [f"![top-1 against MACs, seed {seeds[0]}](sweep-fashion-mnist.png)", ""]
    # the reading of the numbers is hand-written in benchmarks/SWEEP.md; this file holds the tables alone
    atomic_write_text(Path(args.out), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
