"""MACs of attention computed outside conv/linear modules: products of two activations (QKᵀ, AV, SDPA) and
projections applied functionally, read off one forward's autograd graph. They stay dense under gating."""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from .graph import Recorder, first_tensor, graph

__all__ = ["attention_macs", "module_linear_nodes", "products_macs"]


def attention_macs(model: nn.Module, input_size: Tuple[int, int, int]) -> float:
    """MACs per sample of attention computed outside conv/linear modules at ``input_size``: the products between
    activations (QKᵀ, AV) and projections applied functionally (``nn.MultiheadAttention``'s in- and out-projection,
    torchvision Swin's qkv). One forward of a single image, in eval mode, read off its autograd graph; the model is
    left as it was."""
    was, rec, handles = model.training, Recorder(), []
    modules = dict(model.named_modules())
    p = next(model.parameters(), None)
    try:
        model.eval()
        for name, m in modules.items():
            if isinstance(m, nn.Linear):
                handles.append(m.register_forward_pre_hook(rec.pre(name)))
                handles.append(m.register_forward_hook(rec.post(name)))
        x = torch.randn(1, *input_size, device=p.device if p is not None else None,
                        dtype=p.dtype if p is not None else None, requires_grad=True)
        with torch.inference_mode(False), torch.enable_grad():
            out = first_tensor(model(x))
            if out.grad_fn is None:
                return 0.0
            return float(products_macs(graph(out.grad_fn)[0], module_linear_nodes(modules, rec.calls)))
    finally:
        for h in handles:
            h.remove()
        model.train(was)


_PASS_THROUGH = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AddBackward0", "SqueezeBackward0",
                 "SqueezeBackward1", "UnsqueezeBackward0", "ExpandBackward0")


def module_linear_nodes(modules: Dict[str, nn.Module], calls: Dict[str, List[dict]]) -> set:
    """The mm/addmm autograd nodes that nn.Linear module calls produced (their MACs are the ops' own)."""
    marked = set()
    for name, cs in calls.items():
        if not isinstance(modules.get(name), nn.Linear):
            continue
        for c in cs:
            n = c.get("out", (None,))[0] if c.get("out") else None
            while n is not None and type(n).__name__ in _PASS_THROUGH:
                n = n.next_functions[0][0] if n.next_functions else None
            if n is not None:
                marked.add(n)
    return marked


def products_macs(nodes, module_linear: set) -> int:
    return sum(_matmul_macs(n) if n not in module_linear else 0 for n in nodes)


def _matmul_macs(node) -> int:
    """MACs of one autograd node that is a matrix product outside the conv/linear modules, else 0: a product of two
    activations, or a linear layer applied functionally (an mm/addmm with a weight, not from an nn.Linear call).
    SDPA, per head and batch: QKᵀ costs L·S·E and AV costs L·S·E_v (as ptflops and torch.utils.flop_counter)."""
    kind = type(node).__name__
    try:
        if kind == "AddmmBackward0":              # F.linear(x, W, b) on a 2-D view; sizes are saved even for frozen W
            a, b = node._saved_mat1_sym_sizes, node._saved_mat2_sym_sizes
            return a[0] * a[1] * b[1]
        if kind.startswith("ScaledDotProduct"):
            q, k, v = node._saved_query, node._saved_key, node._saved_value
            return math.prod(q.shape[:-2]) * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        if kind == "BmmBackward0":
            a, b = node._saved_self, node._saved_mat2
        elif kind == "BaddbmmBackward0":
            a, b = node._saved_batch1, node._saved_batch2
        elif kind == "MmBackward0":                # two activations, or F.linear without a bias
            a, b = node._saved_self_sym_sizes, node._saved_mat2_sym_sizes
            return a[0] * a[1] * b[1]
        else:
            return 0
        return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    except (AttributeError, RuntimeError):     # a saved tensor we cannot read: count nothing rather than guess
        return 0
