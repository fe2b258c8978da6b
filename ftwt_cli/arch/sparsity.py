"""Which channels of a tensor are structurally zero, as a sparsity expression: for every conv/linear (and every gate)
of a traced model, the expression of the tensor it reads.

A unit's mask is carried through activations with f(0)=0, pooling, padding and copies, concatenated by ``cat``,
sliced by ``split``/``slice``, multiplied (zero where any factor is), summed (zero only where every term is),
flattened (``repeat``). Anything not modelled is "dense", so MACs can be over-counted but never under-counted.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn

from .graph import saved_dim
from .plan import Expr, expr_width, simplify

__all__ = ["Sparsity", "inputs"]

_ZERO_PRESERVING = {
    "ReluBackward0", "ReluBackward1", "HardtanhBackward0", "HardtanhBackward1", "LeakyReluBackward0",
    "LeakyReluBackward1", "GeluBackward0", "SiluBackward0", "HardswishBackward0", "MishBackward0",
    "EluBackward0", "EluBackward1", "TanhBackward0", "PreluKernelBackward0", "CeluBackward0",
    "MaxPool2DWithIndicesBackward0", "AvgPool2DBackward0", "AdaptiveAvgPool2DBackward0",
    "AdaptiveMaxPool2DBackward0", "ConstantPadNdBackward0", "CloneBackward0", "ToCopyBackward0",
    "MaxPool1DWithIndicesBackward0", "AliasBackward0", "ExpandBackward0", "ContiguousBackward0",
}
_RESHAPES = {"ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0", "SqueezeBackward0",
             "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3", "UnsqueezeBackward0", "FlattenBackward0"}


def inputs(node) -> List[Optional[Tuple[Any, int]]]:
    """A node's inputs as (node, output number), None where an input is a constant."""
    return [(nx, i) if nx is not None else None for nx, i in node.next_functions]


class Sparsity:
    """Sparsity expressions over one traced graph. ``unit_ends`` (a unit's masked node → (unit, width)) and ``fixed``
    (a module → its input's expression, for channels-last readers the dim-1 walk cannot follow) are filled in by
    the tracer before the first expression is asked for."""

    def __init__(self, modules: Dict[str, nn.Module], calls: Dict[str, List[dict]], shapes: Dict[Any, list], x) -> None:
        self.modules, self.calls, self.shapes, self.x = modules, calls, shapes, x
        self.unit_ends: Dict[Any, Tuple[str, int]] = {}
        self.fixed: Dict[str, Expr] = {}
        self.memo: Dict[Tuple[Any, int], Expr] = {}

    def _width(self, node, nr: int) -> int:
        s = self.shapes.get(node, [None])
        s = s[nr] if nr < len(s) else None
        return int(s[1]) if s is not None and len(s) > 1 else 1

    def input_expr(self, name: str) -> Expr:
        """The expression of the tensor module ``name`` reads (dense where it cannot be followed)."""
        if name in self.fixed:
            return self.fixed[name]
        call = self.calls[name][0]
        m = self.modules[name]
        width = m.in_features if isinstance(m, nn.Linear) else m.in_channels
        if not call["in"] or (isinstance(m, nn.Linear) and len(call.get("in_shape") or ()) > 2):
            return ["dense", width]      # channels last: the walk below follows dim 1 only
        return self.tensor_expr(call["in"], width)

    def tensor_expr(self, node_nr: Tuple[Any, int], width: int) -> Expr:
        """The expression of one output (node, output number) of the graph, as a tensor of ``width`` channels
        (dense where it cannot be followed)."""
        old = sys.getrecursionlimit()
        sys.setrecursionlimit(max(old, 20000))
        try:
            e = self._expr(*node_nr)
        finally:
            sys.setrecursionlimit(old)
        return e if expr_width(e) == width else ["dense", width]

    def _expr(self, node, nr: int) -> Expr:
        key = (node, nr)
        if key not in self.memo:
            self.memo[key] = simplify(self._expr_uncached(node, nr))
        return self.memo[key]

    def _expr_uncached(self, node, nr: int) -> Expr:
        if node in self.unit_ends:
            return ["unit", *self.unit_ends[node]]
        kind = type(node).__name__
        width = self._width(node, nr)
        dense = ["dense", width]
        ins = inputs(node)
        if kind in _ZERO_PRESERVING or kind in _RESHAPES:
            if not ins or ins[0] is None:
                return dense
            src = self._expr(*ins[0])
            if kind in _RESHAPES:
                return self._reshape(src, ins[0], node, nr)
            return src if expr_width(src) == width else dense
        if kind.startswith("MeanBackward"):
            dims = getattr(node, "_saved_dim", None)
            in_shape = self.shapes.get(ins[0][0], [None])[ins[0][1]] if ins and ins[0] else None
            if dims is not None and in_shape is not None and all((d % len(in_shape)) >= 2 for d in dims):
                src = self._expr(*ins[0])
                return src if expr_width(src) == width else dense
            return dense
        if kind in ("MulBackward0", "DivBackward0"):
            tensors = [i for i in ins if i is not None]
            if kind == "DivBackward0" and (ins[0] is None):
                return dense
            terms = [self._expr(*i) for i in (tensors if kind == "MulBackward0" else [ins[0]])]
            terms = [t for t in terms if expr_width(t) == width]        # broadcast operands (width 1) drop out
            return ["all", terms] if terms else dense
        if kind in ("AddBackward0", "SubBackward0"):
            if any(i is None for i in ins):                         # x + constant: zeros become the constant
                return dense
            terms = [self._expr(*i) for i in ins]
            if any(expr_width(t) != width for t in terms):
                return dense
            return ["any", terms]
        if kind == "CatBackward0":
            dim = saved_dim(node)
            shape = self.shapes.get(node, [None])[0]
            if shape is None or dim % len(shape) != 1 or any(i is None for i in ins):
                return dense
            return ["cat", [self._expr(*i) for i in ins]]
        if kind in ("SplitBackward0", "SplitWithSizesBackward0", "SliceBackward0", "NarrowBackward0"):
            if not ins or ins[0] is None:
                return dense
            parent_shape = self.shapes.get(ins[0][0], [None])[ins[0][1]]
            if parent_shape is None:
                return dense
            dim = saved_dim(node) % len(parent_shape)
            if dim != 1:
                src = self._expr(*ins[0])
                return src if expr_width(src) == width else dense
            if kind == "SplitWithSizesBackward0":
                sizes = list(node._saved_split_sizes)
                start = sum(sizes[:nr])
                stop = start + sizes[nr]
            elif kind == "SplitBackward0":
                size = int(node._saved_split_size)
                start, stop = nr * size, min((nr + 1) * size, parent_shape[1])
            elif kind == "SliceBackward0":
                start, end, step = node._saved_start, node._saved_end, node._saved_step
                if step != 1:
                    return dense
                start = 0 if start is None else int(start)
                stop = min(parent_shape[1], int(end) if end is not None else parent_shape[1])
            else:
                return dense
            return ["slice", self._expr(*ins[0]), start, stop]
        return dense

    def _reshape(self, src: Expr, parent, node, nr) -> Expr:
        pshape = self.shapes.get(parent[0], [None])[parent[1]] if type(parent[0]).__name__ != "AccumulateGrad" else tuple(self.x.shape)
        shape = self.shapes.get(node, [None])[nr]
        if pshape is None or shape is None or len(shape) < 2 or len(pshape) < 2:
            return ["dense", shape[1] if shape and len(shape) > 1 else 1]
        if shape[0] == pshape[0] and shape[1] == pshape[1]:
            return src
        if len(shape) == 2 and shape[1] == math.prod(pshape[1:]):     # flatten (B,C,H,W) → (B, C·H·W)
            return ["repeat", src, math.prod(pshape[2:])]
        return ["dense", shape[1]]
