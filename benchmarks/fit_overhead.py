"""Cost of one fit-gates step (gated forward + ground truth + BCE + gate update) against a dense forward of the
same batch, at the Fashion-MNIST bench's 32 px and at ImageNet's 224 px. Measured in one process, interleaved,
minimum over rounds. Prints a table.

    python benchmarks/fit_overhead.py
"""
from __future__ import annotations

import time

import torch
import torchvision

from ftwt_cli.dataflow import trace_plan
from ftwt_cli.gating import GatedModel
from ftwt_cli.runtime import keep_freed_memory
from ftwt_cli.train import _batch_metrics, _gate_optimizer, gate_grads


def measure(size: int, batch: int, rounds: int):
    torch.manual_seed(0)
    dense = torchvision.models.resnet18(num_classes=10).eval()
    net = torchvision.models.resnet18(num_classes=10).eval()
    net.load_state_dict(dense.state_dict())
    g = GatedModel(net, trace_plan(net, (3, size, size))).eval().set_gates("predict", r=0.92)
    for p in g.backbone.parameters():
        p.requires_grad_(False)
    g.frozen_backbone = True              # as fit_gates runs it: no autograd; gate_grads gives the gradients
    for p in g.gates.parameters():        # gates that close some filters, as after a little fitting
        torch.nn.init.normal_(p, std=0.05)
    opt = _gate_optimizer(g, 0.01)
    x = torch.randn(batch, 3, size, size)

    def fit():
        g.collect_targets = True
        g(x)
        float(gate_grads(g))
        opt.step()
        _batch_metrics(g)

    def gated():
        g.collect_targets = False
        with torch.no_grad():
            g(x)

    def plain():
        with torch.no_grad():
            dense(x)
    ts = {"dense forward": [], "gated forward": [], "fit-gates step": []}
    for _ in range(rounds):
        for k, f in (("dense forward", plain), ("gated forward", gated), ("fit-gates step", fit)):
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    return {k: min(v) * 1e3 for k, v in ts.items()}


if __name__ == "__main__":
    keep_freed_memory()                   # as the ftwt command does
    print("| input | batch | dense forward ms | gated forward ms (ratio) | fit-gates step ms (ratio) |")
    print("|---|---|---|---|---|")
    for size, batch, rounds in ((32, 128, 12), (224, 32, 4)):
        m = measure(size, batch, rounds)
        d = m["dense forward"]
        print(f"| {size} px | {batch} | {d:.1f} | {m['gated forward']:.1f} ({m['gated forward'] / d:.2f}×) | "
              f"{m['fit-gates step']:.1f} ({m['fit-gates step'] / d:.2f}×) |", flush=True)
