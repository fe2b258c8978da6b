"""A cheap screen of the options that may make the dynamic model beat its static twin (issue 28), before any full
benchmark: one seed, one cut, a Fashion-MNIST subset, a few epochs. Losers are recorded too.

    python benchmarks/screen_dynamic.py [--arch resnet18] [--cut 0.5] [--train 8000] [--val 2000]
        [--baseline-epochs 10] [--fit-epochs 2] [--finetune-epochs 2] [--configs NAME,...]

Per configuration, one `ftwt sweep` (library calls) in benchmarks/_work/screen-*: a dynamic point at --cut (the r
found on training images), its Torch-Pruning L1 twin at the dynamic point's MACs fine-tuned with the same budget, and
(first configuration) the dense control. Writes benchmarks/results/screen_dynamic.md and screen_dynamic.json (rows in
the format of dynamic-vs-static.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch
import torchvision

from ftwt_cli.arch import DataConfig
from ftwt_cli.data import open_data
from ftwt_cli.demo import train_classifier, write_fashion_subset
from ftwt_cli.eval.run import evaluate_run
from ftwt_cli.formats.rundir import atomic_write_text, read_meta
from ftwt_cli.sweep import run_sweep
from ftwt_cli.sweep.paired import mcnemar, unpack
from ftwt_cli.train import FinetuneConfig, FitGatesConfig

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
MEAN, STD = (0.2860,) * 3, (0.3530,) * 3          # Fashion-MNIST's own statistics, repeated to 3 channels
CFG = DataConfig((3, 32, 32), MEAN, STD, "bilinear", 1.0, "center")
# name -> (FitGatesConfig changes, attach option changes); the finetune config is shared
CONFIGS = {"ftwt (defaults)": ({}, {}),
           "+ BN recalibration": ({"recalibrate_bn": 2048}, {}),
           # MobileNets: depthwise convs ungated (their C×C gates cost more than the convs at 32 px, as in SWEEP.md) ...
           "depthwise ungated": ({}, {"exclude": ["*.conv.1.0"]}),
           # ... against depthwise convs that follow their expansion's mask (no gate)
           "+ depthwise follow": ({}, {"depthwise_follow": True}),
           "+ depthwise follow + BN recalibration": ({"recalibrate_bn": 2048}, {"depthwise_follow": True}),
           # gates of channel groups (issue 29): one decision per 8 or 16 channels, ordered by co-firing or by index
           "groups of 8": ({}, {"group_size": 8}),
           "groups of 16": ({}, {"group_size": 16}),
           "groups of 16 (index order)": ({"group_order": "index"}, {"group_size": 16}),
           "groups of 16 + BN recalibration": ({"recalibrate_bn": 2048}, {"group_size": 16}),
           # residual-stream units (item 1): each block's output masked after its add, the next block reads it sparse
           "residual stream": ({}, {"residual_stream": True})}
# finetune changes per configuration (the static twin and the control get the same budget; gate settings do not
# apply to them): FTWT's schedule, the gates co-trained with the backbone (joint) and frozen after half the epochs
FINETUNE = {"joint (gates frozen at half)": {"mode": "joint", "freeze_gates_at": 0.5},
            # task-aware gates (item 5b): straight-through masks, the budget term holding the point's --cut
            "task-aware + budget (BCE at 1)": {"task_aware": True, "bce_weight": 1.0},
            "task-aware + budget (no BCE)": {"task_aware": True, "bce_weight": 0.0}}
for _name in FINETUNE:
    CONFIGS[_name] = ({}, {})
# MobileNets: the same, with the best MobileNet configuration (depthwise follow, BN recalibration)
FINETUNE["+ depthwise follow + BN recalibration + task-aware"] = FINETUNE["task-aware + budget (no BCE)"]
CONFIGS["+ depthwise follow + BN recalibration + task-aware"] = ({"recalibrate_bn": 2048}, {"depthwise_follow": True})
# residual-stream units with task-aware gates (item 1 with item 5b)
FINETUNE["residual stream + task-aware"] = FINETUNE["task-aware + budget (no BCE)"]
CONFIGS["residual stream + task-aware"] = ({}, {"residual_stream": True})
ARCHS = ("resnet18", "mobilenet_v2")              # torchvision models the screen trains


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet18", choices=ARCHS, help="a torchvision model")
    ap.add_argument("--cut", type=float, default=0.5)
    ap.add_argument("--train", type=int, default=8000)
    ap.add_argument("--val", type=int, default=2000)
    ap.add_argument("--baseline-epochs", type=int, default=10)
    ap.add_argument("--fit-epochs", type=int, default=2)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--configs", default="ftwt (defaults),+ BN recalibration")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/screen_dynamic[-ARCH].md")
    args = ap.parse_args()
    args.out = args.out or str(HERE / "results" / ("screen_dynamic.md" if args.arch == "resnet18" else f"screen_dynamic-{args.arch}.md"))
    WORK.mkdir(exist_ok=True)
    data = write_fashion_subset(WORK / f"fashion-{args.train}-{args.val}", args.train, args.val)
    ckpt = WORK / f"{args.arch}-fashion{args.train}-b{args.baseline_epochs}.pth"
    if not ckpt.exists():
        t0 = time.time()
        torch.manual_seed(0)
        model = train_classifier(torchvision.models.get_model(args.arch, num_classes=10), open_data(str(data), CFG, num_classes=10),
                                 args.baseline_epochs, workers=0)
        torch.save(model.state_dict(), ckpt)
        print(f"baseline: {time.time() - t0:.0f} s", flush=True)
    attach = dict(arch=f"torchvision:{args.arch}", input_size=[3, 32, 32], mean=list(MEAN), std=list(STD), crop_pct=1.0)
    ft = FinetuneConfig(epochs=args.finetune_epochs, batch_size=128, workers=0)
    rows, points = [], {}
    for i, name in enumerate(c for c in args.configs.split(",") if c):
        fit_changes, attach_changes = CONFIGS[name]
        fit = FitGatesConfig(epochs=args.fit_epochs, batch_size=128, workers=0, **fit_changes)
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        out = WORK / f"screen-{args.arch}-c{args.cut:g}-b{args.baseline_epochs}-f{args.fit_epochs}-t{args.finetune_epochs}-{slug}"
        t0 = time.time()
        pts = run_sweep(ckpt, str(data), out, target_cuts=[args.cut], static="l1", dense_control=i == 0,
                        attach_options={**attach, **attach_changes}, fit_cfg=fit,
                        finetune_cfg=dataclasses.replace(ft, **FINETUNE.get(name, {})), device="cpu", on_event=print)
        by = {p.kind: p for p in pts}
        dyn, st = by["dynamic"], by["static"]
        fitted = read_meta(Path(dyn.run)).training["fit-gates"].epochs[-1]
        rep = evaluate_run(dyn.run, str(data), workers=0, device="cpu").to_dict()     # the gate diagnostics
        _, _, p = mcnemar(unpack(dyn.correct_bits, dyn.samples), unpack(st.correct_bits, st.samples))
        points[name] = (dyn, st, by.get("control"), by["dense"], fitted, rep, p, time.time() - t0)
        for kind, q in (("dynamic", dyn), ("static", st)) + ((("control", by["control"]),) if "control" in by else ()):
            rows.append({"family": f"torchvision:{args.arch}", "seed": 0, "kind": kind, "config": name if kind == "dynamic" else
                         ("l1" if kind == "static" else "dense control"), "macs_cut": q.cut, "top1": q.top1,
                         **({"delta_vs_best_static": dyn.top1 - st.top1, "p_value": p} if kind == "dynamic" else {})})
    lines = ["# Screen: options for the dynamic model against its static twin", "",
             f"Generated by `python benchmarks/screen_dynamic.py` on {platform.machine()}, {torch.get_num_threads()} "
             f"threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')} (load average "
             f"{os.getloadavg()[0]:.1f} at the end).", "",
             f"* Source: torchvision {args.arch} trained {args.baseline_epochs} epochs at 32 px on a fixed "
             f"{args.train}-image Fashion-MNIST subset; validation: {args.val} test images (one seed).",
             f"* Each configuration: attach → `fit-gates --target-cut {args.cut:g}` ({args.fit_epochs} epochs) → "
             f"`finetune` ({args.finetune_epochs} epochs, decoupled unless the configuration says otherwise); its Torch-Pruning L1 twin pruned to the dynamic "
             "point's mean MACs (gates included) and fine-tuned with the same budget; MACs exact. Minutes: this "
             "invocation's (\"resumed\": the points were finished by an earlier run of the same command).", "",
             "| configuration | cut | top-1 after fit-gates | top-1 after finetune | static twin (L1): cut / top-1 | "
             "Δ dyn − static (pt) | McNemar p | frozen majority masks (BN re-estimated): top-1 | varying channels | FTWT-counter cut | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (dyn, st, ctl, dense, fitted, rep, p, secs) in points.items():
        ftwt_cut = 1 - rep["ftwt_counter_macs"] / rep["dense_macs"] if rep.get("ftwt_counter_macs") else None
        lines.append(f"| {name} | {dyn.cut:.1%} | {fitted['val_top1']:.2%} | {dyn.top1:.2%} | {st.cut:.1%} / {st.top1:.2%} | "
                     f"{(dyn.top1 - st.top1) * 100:+.2f} | {p:.3g} | "
                     + (f"{rep['frozen_top1']:.2%}" if rep.get("frozen_top1") is not None else "–") + " | "
                     + (f"{rep['varying_share']:.1%}" if rep.get("varying_share") is not None else "–") + " | "
                     + (f"{ftwt_cut:.1%}" if ftwt_cut is not None else "–")
                     + (f" | {secs / 60:.1f} |" if secs > 30 else " | resumed |"))     # finished by an earlier run
    first = next(iter(points.values()))
    if first[2] is not None:
        lines += ["", f"Dense source: {first[3].top1:.2%}; dense control ({args.finetune_epochs} more epochs, every gate "
                      f"open): {first[2].top1:.2%}."]
    atomic_write_text(Path(args.out), "\n".join(lines) + "\n")
    atomic_write_text(Path(args.out).with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
