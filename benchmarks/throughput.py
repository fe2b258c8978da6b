"""Images per second of a dense forward, a dense training step, a fit-gates step and a finetune step, for ResNet-18 and
ResNet-50 at 224 px on synthetic data, on one device, with and without AMP. One process, the four kinds of step
interleaved round by round, median over rounds; prints a table of ratios.

Targets: a fit-gates step ≤ 1.10× a dense forward, a finetune step ≤ 1.25× a dense training step.

    python benchmarks/throughput.py [--device auto] [--amp off,auto] [--models resnet18,resnet50] [--batch 32]
        [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

from ftwt_cli.arch import trace_plan
from ftwt_cli.gating import GatedModel
from ftwt_cli.runtime.device import resolve_precision
from ftwt_cli.train import batch_metrics, fit_gates_step, gate_loss, gate_optimizer
from ftwt_cli.train.loops import METRICS_EVERY


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, batch: int, rounds: int, device: str, amp: str) -> dict:
    prec = resolve_precision(device, amp)
    dev = prec.device
    torch.manual_seed(0)
    dense = prec.model(torchvision.models.get_model(name, num_classes=1000))
    net = torchvision.models.get_model(name, num_classes=1000)
    net.load_state_dict(dense.state_dict())
    g = GatedModel(net, trace_plan(net, (3, 224, 224))).set_gates("predict", r=0.92)
    g = prec.model(g)
    for p in g.gates.parameters():       # gates that close some filters, as after a little fitting
        torch.nn.init.normal_(p, std=0.05)
    x = prec.batch(torch.randn(batch, 3, 224, 224))
    y = torch.randint(0, 1000, (batch,), device=dev)
    dense_opt = torch.optim.SGD(dense.parameters(), lr=1e-4, momentum=0.9)
    bb_opt = torch.optim.SGD(g.backbone.parameters(), lr=1e-4, momentum=0.9)
    gate_opt = gate_optimizer(g, 1e-3)
    scaler = prec.scaler()

    def backward(loss, *opts):
        for o in opts:
            o.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            for o in opts:
                scaler.step(o)
            scaler.update()
        else:
            loss.backward()
            for o in opts:
                o.step()

    def dense_forward():
        dense.eval()
        with torch.no_grad(), prec.autocast():
            dense(x)

    def dense_train():
        dense.train()
        with prec.autocast():
            loss = F.cross_entropy(dense(x).float(), y)
        backward(loss, dense_opt)

    step = [0]

    def fit():
        g.eval()
        g.backbone.requires_grad_(False)
        fit_gates_step(g, x, gate_opt, prec, scaler)
        if step[0] % METRICS_EVERY == 0:
            batch_metrics(g)
        step[0] += 1

    def finetune():
        g.train()
        g.backbone.requires_grad_(True)
        with g.collecting(decoupled=True), prec.autocast():
            out = g(x)
        loss = F.cross_entropy(out.float(), y) + gate_loss(g.last_logits, g.last_targets)
        backward(loss, bb_opt, gate_opt)

    fns = {"dense forward": dense_forward, "dense train step": dense_train, "fit-gates step": fit, "finetune step": finetune}
    for f in fns.values():               # warm-up
        f()
    ts = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            _sync(dev)
            t = time.perf_counter()
            f()
            _sync(dev)
            ts[k].append(time.perf_counter() - t)
    return {k: batch / statistics.median(v) for k, v in ts.items()} | {"device": str(dev), "amp": prec.amp}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="off,auto", help="comma-separated AMP modes to measure")
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, batch {args.batch}, 224 px, "
          f"median of {args.rounds} interleaved rounds")
    print("| model | device | amp | dense fwd img/s | dense train img/s | fit-gates img/s | finetune img/s "
          "| fit-gates / dense fwd (time) | finetune / dense train (time) |")
    print("|---|---|---|---|---|---|---|---|---|")
    seen = set()
    for name in args.models.split(","):
        for amp in args.amp.split(","):
            m = measure(name, args.batch, args.rounds, args.device, amp)
            if (name, m["amp"]) in seen:            # auto resolved to a mode already measured
                continue
            seen.add((name, m["amp"]))
            print(f"| {name} | {m['device']} | {m['amp']} | {m['dense forward']:.1f} | {m['dense train step']:.1f} | "
                  f"{m['fit-gates step']:.1f} | {m['finetune step']:.1f} | "
                  f"{m['dense forward'] / m['fit-gates step']:.2f}× | {m['dense train step'] / m['finetune step']:.2f}× |",
                  flush=True)


if __name__ == "__main__":
    main()
