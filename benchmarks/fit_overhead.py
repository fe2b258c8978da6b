"""Cost of one fit-gates step (gated forward + ground-truth scores and ranking + BCE + autograd + Adam, as
``ftwt_cli.train.fit_gates_step`` runs it, plus the training metrics amortised over ``METRICS_EVERY`` steps) against
a dense forward of the same batch, for ResNet-18 at 224 px (batch 32) and at the Fashion-MNIST bench's 32 px (batch
128). Measured in one process, interleaved, minimum over rounds. Prints a table.

    python benchmarks/fit_overhead.py [--rounds-224 6] [--rounds-32 20]
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision

from ftwt_cli.arch import trace_plan
from ftwt_cli.gating import GatedModel
from ftwt_cli.train import METRICS_EVERY, batch_metrics, fit_gates_step, gate_optimizer


def measure(size: int, batch: int, rounds: int) -> dict:
    torch.manual_seed(0)
    dense = torchvision.models.resnet18(num_classes=10).eval()
    net = torchvision.models.resnet18(num_classes=10).eval()
    net.load_state_dict(dense.state_dict())
    g = GatedModel(net, trace_plan(net, (3, size, size))).eval().set_gates("predict", r=0.92)
    g.backbone.requires_grad_(False)      # as fit_gates runs it: autograd records only the gates
    for p in g.gates.parameters():        # gates that close some filters, as after a little fitting
        torch.nn.init.normal_(p, std=0.05)
    opt = gate_optimizer(g, 0.01)
    x = torch.randn(batch, 3, size, size)

    def fit():
        float(fit_gates_step(g, x, opt))

    def metrics():
        batch_metrics(g)

    def gated():
        with torch.no_grad():
            g(x)

    def plain():
        with torch.no_grad():
            dense(x)
    ts = {"dense": [], "gated": [], "fit": [], "metrics": []}
    for _ in range(rounds):
        for k, f in (("dense", plain), ("gated", gated), ("fit", fit), ("metrics", metrics)):
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    m = {k: min(v) * 1e3 for k, v in ts.items()}
    m["step"] = m["fit"] + m["metrics"] / METRICS_EVERY
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds-224", type=int, default=6)
    ap.add_argument("--rounds-32", type=int, default=20)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print("| input | batch | dense forward ms | gated forward ms (ratio) | fit-gates step ms (ratio) |")
    print("|---|---|---|---|---|")
    for size, batch, rounds in ((224, 32, args.rounds_224), (32, 128, args.rounds_32)):
        m = measure(size, batch, rounds)
        d = m["dense"]
        print(f"| {size} px | {batch} | {d:.1f} | {m['gated']:.1f} ({m['gated'] / d:.2f}×) | "
              f"{m['step']:.1f} ({m['step'] / d:.2f}×) |", flush=True)


if __name__ == "__main__":
    main()
