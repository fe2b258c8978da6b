"""A screen of the hybrid model (issue 28, item 5) against the dynamic model it comes from and their static twins.

    python benchmarks/screen_hybrid.py [--arch resnet18|mobilenet_v2] [--cut 0.5] [--epsilons 0.05,0.25,0.45]
        [--fit-epochs 2] [--finetune-epochs 2]

The setup of ``screen_dynamic.py`` (torchvision ResNet-18 trained 10 epochs at 32 px on a fixed 8 000-image
Fashion-MNIST subset, 2 000 test images, one seed; MobileNetV2 in its configuration of DYNAMIC-VS-STATIC.md: depthwise
convs follow their expansion's mask, BatchNorm recalibrated after fit-gates on 2 048 images). One run is attached and its gates fitted (``--target-cut``); from
that one fitted run come the dynamic point (fine-tuned as it is) and one hybrid per ε (``ftwt hybrid``, then
fine-tuned with the same budget). Each of them gets a Torch-Pruning L1 twin pruned to its own mean exact MACs and
fine-tuned with the same budget, and a McNemar test on the same test images. Work in benchmarks/_work/screen-hybrid-*;
writes benchmarks/results/screen_hybrid.md and .json (rows in the format of dynamic-vs-static.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
import torchvision

from ftwt_cli.attach import AttachOptions, attach
from ftwt_cli.data import open_data
from ftwt_cli.demo import train_classifier, write_fashion_subset
from ftwt_cli.eval.run import evaluate_run
from ftwt_cli.formats.rundir import atomic_write_text, is_run, read_meta
from ftwt_cli.runs.hybrid import make_hybrid_run
from ftwt_cli.runs.static import make_static_run
from ftwt_cli.sweep.paired import mcnemar
from ftwt_cli.train import FinetuneConfig, FitGatesConfig, finetune, fit_gates

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
MEAN, STD = (0.2860,) * 3, (0.3530,) * 3
# torchvision models the screen trains -> (attach option changes, fit-gates config changes)
ARCHS = {"resnet18": ({}, {}), "mobilenet_v2": ({"depthwise_follow": True}, {"recalibrate_bn": 2048})}


def _trained(run: Path, phase: str, epochs: int) -> bool:
    t = read_meta(run).training.get(phase)
    return bool(t) and len(t.epochs) >= epochs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet18", choices=tuple(ARCHS))
    ap.add_argument("--cut", type=float, default=0.5)
    ap.add_argument("--epsilons", default="0.05,0.25,0.45")
    ap.add_argument("--train", type=int, default=8000)
    ap.add_argument("--val", type=int, default=2000)
    ap.add_argument("--baseline-epochs", type=int, default=10)
    ap.add_argument("--fit-epochs", type=int, default=2)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/screen_hybrid[-ARCH].md")
    args = ap.parse_args()
    arch = args.arch
    args.out = args.out or str(HERE / "results" / ("screen_hybrid.md" if arch == "resnet18" else f"screen_hybrid-{arch}.md"))
    attach_changes, fit_changes = ARCHS[arch]
    WORK.mkdir(exist_ok=True)
    data = str(write_fashion_subset(WORK / f"fashion-{args.train}-{args.val}", args.train, args.val))
    ckpt = WORK / f"{arch}-fashion{args.train}-b{args.baseline_epochs}.pth"
    opts = AttachOptions(arch=f"torchvision:{arch}", input_size=(3, 32, 32), mean=MEAN, std=STD, crop_pct=1.0,
                         **attach_changes)
    if not ckpt.exists():
        t0 = time.time()
        torch.manual_seed(0)
        from ftwt_cli.arch import DataConfig
        cfg = DataConfig((3, 32, 32), MEAN, STD, "bilinear", 1.0, "center")
        model = train_classifier(torchvision.models.get_model(arch, num_classes=10), open_data(data, cfg, num_classes=10),
                                 args.baseline_epochs, workers=0)
        torch.save(model.state_dict(), ckpt)
        print(f"baseline: {time.time() - t0:.0f} s", flush=True)
    work = WORK / f"screen-hybrid{'' if arch == 'resnet18' else '-' + arch}-c{args.cut:g}-b{args.baseline_epochs}-f{args.fit_epochs}-t{args.finetune_epochs}"
    work.mkdir(exist_ok=True)
    ft = FinetuneConfig(epochs=args.finetune_epochs, batch_size=128, workers=0)
    dense, fitted = work / "dense", work / "fitted"
    if not is_run(dense):
        attach(ckpt, opts, run_dir=dense)
    if not is_run(fitted) or not _trained(fitted, "fit-gates", args.fit_epochs):
        attach(ckpt, opts, run_dir=fitted, force=True)
        fit_gates(fitted, data, FitGatesConfig(epochs=args.fit_epochs, batch_size=128, workers=0, target_cut=args.cut,
                                                    **fit_changes),
                  device="cpu")
    fit_top1 = read_meta(fitted).training["fit-gates"].epochs[-1]["val_top1"]
    n_units = len(read_meta(fitted).gating.gated)
    points = [("dynamic (one gate per channel)", None)] + [(f"hybrid ε = {float(e):g}", float(e)) for e in args.epsilons.split(",") if e]
    rows, lines_rows = [], []
    for name, eps in points:
        t0 = time.time()
        slug = "dynamic" if eps is None else f"hybrid-{eps:g}"
        run, twin = work / slug, work / f"{slug}-l1"
        if not is_run(run):
            if eps is None:
                shutil.copytree(fitted, run)
                info = None
            else:
                info = make_hybrid_run(fitted, data, run, epsilon=eps, workers=0)
                print(info, flush=True)
        if not _trained(run, "finetune", ft.epochs):
            finetune(run, data, ft, device="cpu")
        rep = evaluate_run(run, data, workers=0, device="cpu")
        if not is_run(twin):
            make_static_run(dense, twin, rep.macs_mean, "l1")
        if not _trained(twin, "finetune", ft.epochs):
            finetune(twin, data, ft, dense_control=True, device="cpu")
        st = evaluate_run(twin, data, gates="open", workers=0, device="cpu")
        only_dyn, only_st, p = mcnemar(rep.correct, st.correct)
        meta = read_meta(run)
        hy = next((h for h in meta.history if h.get("command") == "hybrid"), None)
        shares = ""
        if meta.static is not None:
            g = meta.gating
            shares = (f"{meta.static.ratio:.1%} removed, {sum(g.fixed_open.values())} ungated in gated layers, "
                      f"{len(g.gated)} of {n_units} layers gated")
        secs = time.time() - t0
        lines_rows.append(f"| {name} | {rep.cut_vs_source:.1%} | {shares or '–'} | {rep.top1:.2%} | {st.cut_vs_source:.1%} / "
                          f"{st.top1:.2%} | {(rep.top1 - st.top1) * 100:+.2f} | {only_dyn} / {only_st} | {p:.3g} | "
                          + (f"{rep.varying_share:.1%}" if rep.varying_share is not None else "–")
                          + (f" | {secs / 60:.1f} |" if secs > 30 else " | resumed |"))
        kind = "dynamic" if eps is None else "hybrid"
        rows.append({"family": f"torchvision:{arch}", "seed": 0, "kind": kind, "config": name, "macs_cut": rep.cut_vs_source,
                     "top1": rep.top1, "delta_vs_best_static": rep.top1 - st.top1, "p_value": p,
                     **({"epsilon": eps, "images": hy.get("images")} if hy else {})})
        rows.append({"family": f"torchvision:{arch}", "seed": 0, "kind": "static", "config": f"l1 (twin of {name})",
                     "macs_cut": st.cut_vs_source, "top1": st.top1})
        print(lines_rows[-1], flush=True)
    lines = ["# Screen: the hybrid model against the dynamic one and their static twins", "",
             f"Generated by `python benchmarks/screen_hybrid.py` on {platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')} (load average {os.getloadavg()[0]:.1f} at the end).", "",
             f"* Source: torchvision {arch}" + (" (attached with --depthwise-follow, fit-gates --recalibrate-bn 2048)"
                                                  if arch == "mobilenet_v2" else "") + f" trained {args.baseline_epochs} epochs at 32 px on a fixed {args.train}-image "
             f"Fashion-MNIST subset; validation: {args.val} test images; one seed.",
             f"* One attached run, gates fitted {args.fit_epochs} epochs at `--target-cut {args.cut:g}` (val top-1 "
             f"{fit_top1:.2%} after fit-gates). The dynamic point is that run fine-tuned {args.finetune_epochs} epochs; "
             f"each hybrid is `ftwt hybrid --epsilon ε` of the same fitted run (firing rates on 2 048 training images), "
             f"fine-tuned {args.finetune_epochs} epochs. Every row has its own L1 twin at its exact mean MACs (gates "
             "included), fine-tuned with the same budget; cuts against the unpruned source.", "",
             "| configuration | exact cut | what the hybrid did | top-1 | L1 twin: cut / top-1 | Δ vs twin (pt) | "
             "only it / only twin right | McNemar p | varying channels | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|", *lines_rows]
    atomic_write_text(Path(args.out), "\n".join(lines) + "\n")
    atomic_write_text(Path(args.out).with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
