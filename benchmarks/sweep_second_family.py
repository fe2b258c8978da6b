"""Dynamic against static pruning on a second model family: the same `ftwt sweep` as sweep_fashion_mnist.py (recipe,
static L1 twin at equal MACs, dense control) on another architecture trained here on Fashion-MNIST at 32 px.

    python benchmarks/sweep_second_family.py [--arch torchvision:mobilenet_v2] [--baseline-epochs 10] [--rs 0.9]

Writes benchmarks/results/sweep_second_family.md (whole).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from fashion_mnist import CFG, train_baseline
from sweep_fashion_mnist import HERE, WORK, sweep, table

from ftwt_cli.arch import build_model, parse_arch
from ftwt_cli.formats.rundir import atomic_write_text


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="torchvision:mobilenet_v2")
    ap.add_argument("--baseline-epochs", type=int, default=10)
    ap.add_argument("--rs", default="0.9")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--exclude", default="*.conv.1.0",
                    help="attach --exclude: MobileNetV2's depthwise convs, whose gates (C×C MACs) cost more than the "
                         "convs at 32 px ('' gates every unit)")
    ap.add_argument("--out", default=str(HERE / "results" / "sweep_second_family.md"))
    args = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    spec = parse_arch(args.arch)
    ckpt = WORK / f"{spec.name}-fashion-mnist-b{args.baseline_epochs}.pth"
    if not ckpt.exists():
        torch.manual_seed(0)
        seconds = train_baseline(ckpt, args.baseline_epochs, args.workers, build_model(spec, 10), CFG)
        print(f"baseline: {seconds:.0f} s", flush=True)
    out = WORK / (f"sweep-{spec.name}-b{args.baseline_epochs}-s{args.seed}" + ("" if args.exclude else "-all"))
    points = sweep(ckpt, out, args.rs, args.seed, "l1", args.workers, arch=str(spec),
                   extra=("--exclude", args.exclude) if args.exclude else ())
    by = {p["name"]: p for p in points}
    ctl = by.get("control", {}).get("top1")
    title = f"# Second model family: {spec}"
    lines = [title, "",
             f"The same sweep (recipe, static L1 twin at the dynamic point's MACs, the same fine-tuning budget, dense control) "
             f"on `{spec}` trained here for {args.baseline_epochs} epochs (SGD, cosine) on Fashion-MNIST at 32 px; "
             f"seed {args.seed}." + (f" Attached with `--exclude '{args.exclude}'`." if args.exclude else ""), "",
             f"Dense source: top-1 {by['dense']['top1']:.2%} at {by['dense']['macs_mean'] / 1e6:.2f} M MACs; dense control "
             + (f"(4 epochs): {ctl:.2%}." if ctl is not None else "not run yet."), "",
             *table(points, "l1"), "",
             "Points not finished: " + (", ".join(p["name"] for p in points if p["status"] != "done") or "none") + ".", ""]
    section = "\n".join(lines)
    print(section)
    atomic_write_text(Path(args.out), section + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
