"""The autograd graph of one traced forward: hooks that remember which node made each module's input and output
(``Recorder``), the nodes and their consumers (``graph``), every node's output shapes (``node_shapes``), as
Torch-Pruning's DependencyGraph reads them."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = ["Recorder", "first_tensor", "graph", "node_shapes", "saved_dim"]


class Recorder:
    """Forward (pre-)hooks that remember, per module call, the autograd nodes of input and output."""

    def __init__(self) -> None:
        self.calls: Dict[str, List[dict]] = {}
        self.input: Optional[torch.Tensor] = None

    def pre(self, name: str):
        def hook(module, args):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            self.calls.setdefault(name, []).append(
                {"in": (x.grad_fn, x.output_nr) if x is not None and x.grad_fn is not None else None,
                 "in_shape": tuple(x.shape) if x is not None else None,
                 "in_is_input": x is not None and x is self.input})       # the image itself (a leaf, no grad_fn)
        return hook

    def post(self, name: str):
        def hook(module, args, out):
            t = out if isinstance(out, torch.Tensor) else None
            if self.calls.get(name):
                self.calls[name][-1]["out"] = (t.grad_fn, t.output_nr) if t is not None and t.grad_fn is not None else None
                self.calls[name][-1]["out_shape"] = tuple(t.shape) if t is not None else None
        return hook


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    for o in out:
        if isinstance(o, torch.Tensor):
            return o
    raise TypeError("model returned no tensor")


def graph(root) -> Tuple[List[Any], Dict[Any, List[Any]]]:
    nodes, consumers, stack, seen = [], {}, [root], {root}
    while stack:
        n = stack.pop()
        nodes.append(n)
        for nxt, _ in n.next_functions:
            if nxt is None:
                continue
            consumers.setdefault(nxt, []).append(n)
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return nodes, consumers


def node_shapes(nodes, out: torch.Tensor, x: torch.Tensor) -> Dict[Any, List[Optional[Tuple[int, ...]]]]:
    """The shape of every node's outputs, read from the gradients flowing into it during one backward.
    ``autograd.grad`` w.r.t. the input only, so no parameter's ``.grad`` is touched."""
    shapes: Dict[Any, List] = {}
    handles = []
    for n in nodes:
        if type(n).__name__ == "AccumulateGrad":
            continue

        def pre(grad_outputs, n=n):
            shapes[n] = [tuple(g.shape) if g is not None else None for g in grad_outputs]
        handles.append(n.register_prehook(pre))
    try:
        torch.autograd.grad(out.float().sum(), [x], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return shapes


def saved_dim(node) -> int:
    """A node's saved ``dim`` as a signed int (autograd exposes dim=-1 as 2**64 - 1)."""
    d = int(getattr(node, "_saved_dim", 0))
    return d - (1 << 64) if d >= 1 << 63 else d
