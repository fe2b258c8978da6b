"""Trace one forward pass into the facts gating needs, from the model's real dataflow (not module names).

We hook every module to learn which autograd node produced each module's input and output, then walk the
autograd graph (the approach of Torch-Pruning's DependencyGraph). From it we derive:

* gateable units: a Conv2d whose output is read only by a BatchNorm (optional), whose output in turn is
  read only by an activation with f(0)=0 (optional). The mask goes on the last module of conv→norm; the
  activation keeps masked channels at zero because f(0)=0. Convs that no conv/linear reads downstream
  (classifier convs) are not gateable; 1×1 shortcut convs are marked so callers can skip them.
* MLP units (``kind="mlp"``): a Linear (fc1) on tokens, channels last — (B, N, C) for a ViT, (B, H, W, C) for
  ConvNeXt or Swin — whose output is read only by an activation with f(0)=0, whose output (through dropout or
  identities, which leave no autograd node in eval mode) is read only by a Linear (fc2). The hidden units are the
  filters: the mask goes on fc1's output, so the activation and fc2 see exact zeros.
* gated MLP units (``kind="glu"``): fc2 reads the elementwise product act(g) · x of two halves of one fc1 (timm
  ``GluMlp``) or of two Linears on the same input (SwiGLU: timm ``SwiGLU``, LLaMA-style gate/up projections). Hidden
  unit j is the product's j-th feature; the mask goes on fc2's input, so fc2 reads exact zeros whatever act(0) is,
  and the rows of both fc1 halves (``partner``: the second Linear) for an inactive unit need not run. A norm over the
  hidden units between the product and fc2 couples them: refused.
* attention computed outside conv/linear modules (``bmm``, ``scaled_dot_product_attention``, a ``mm`` of two
  activations, projections applied with ``F.linear``): its MACs per sample at the traced size (``attention_macs``);
  it stays dense.
* for every conv/linear (and every gate), a sparsity expression saying which channels of the tensor it
  reads are structurally zero: the mask of a unit, carried through activations, pooling, padding and
  products, concatenated by ``cat``, sliced by ``split``; a sum is zero only where all its terms are.
  Anything we do not model is "dense", so MACs can be over-counted but never under-counted.

The caller's model is left as it was: hooks are removed in ``finally`` and the train flag is restored.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["Unit", "MacOp", "Plan", "trace_plan", "attention_macs", "Expr", "expr_width"]

# An expression is a JSON-friendly nested list: ["dense", width] | ["unit", name, width] | ["cat", [e, ...]]
# | ["slice", e, start, stop] | ["any", [e, ...]] (active where any term is) | ["all", [e, ...]]
# | ["repeat", e, n] (flatten: each channel becomes n features).
Expr = list

# Autograd nodes that map zero to zero channel by channel (activations with f(0)=0, pooling, padding,
# copies). Pooling is spatial, so a zero channel stays zero.
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
# One mask per sample needs the samples in dim 0 (the trace runs one image, so dim 0 must be 1 there).
_FOLDED = "runs on heads or windows folded into the batch dim: one mask per sample cannot reach them"
# Functional activations (f(0)=0) between fc1 and fc2 of an MLP, by autograd node, as GatedModel names them.
_FUNCTIONAL_ACTS = {"GeluBackward0": "gelu", "ReluBackward0": "relu", "SiluBackward0": "silu"}
# Elementwise activations on the gate side of a GLU product (any f: the mask is on the product, not on fc1).
_ELEMENTWISE = {"GeluBackward0", "SiluBackward0", "ReluBackward0", "SigmoidBackward0", "TanhBackward0",
                "HardswishBackward0", "HardsigmoidBackward0", "MishBackward0", "EluBackward0", "LeakyReluBackward0",
                "SoftplusBackward0", "HardtanhBackward0"}
# Copies between a GLU product and fc2 (dropout and identities leave no node in eval mode).
_COPIES = {"CloneBackward0", "ToCopyBackward0", "ContiguousBackward0", "AliasBackward0"}
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Identity, nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)


def _is_activation(m: nn.Module) -> bool:
    mod = type(m).__module__
    return isinstance(m, _ACT_MODULES) or mod.startswith("timm.layers.activations") or mod.startswith("timm.layers.create_act")


def _zero_at_zero(act: nn.Module, channels: int) -> bool:
    try:
        with torch.no_grad():
            z = torch.zeros(1, channels, 1, 1)
            return bool((act(z) == 0).all())
    except Exception:
        return False


@dataclass(frozen=True)
class Unit:
    """A gateable conv: ``name`` is the conv's path, ``end`` the module whose output is masked."""
    name: str
    end: str
    act: Optional[str]            # path of a separate activation module, "relu" (functional), or None
    in_channels: int
    out_channels: int
    kernel: Tuple[int, int]
    groups: int
    in_expr: Expr                 # sparsity of the conv's (and gate's) input
    shortcut: bool = False        # a 1×1 conv on a residual shortcut
    kind: str = "conv"            # "conv" (channels at dim 1) | "mlp" (a Linear on tokens, channels last) | "glu"
    reader: Optional[str] = None  # mlp, glu: the Linear (fc2) that reads the hidden units (glu: masked on its input)
    partner: Optional[str] = None  # glu: the second fc1 (SwiGLU's gate projection), whose rows follow the mask


@dataclass(frozen=True)
class MacOp:
    """A conv or linear layer: the only layers MACs are counted for (the papers' convention)."""
    name: str
    kind: str                     # "conv" | "linear"
    in_channels: int
    out_channels: int
    kernel_area: int              # k_h·k_w (1 for linear)
    groups: int
    in_expr: Expr
    calls: int = 1                # a layer called more than once is counted dense on every call


@dataclass
class Plan:
    units: List[Unit]
    ops: List[MacOp]
    rejected: Dict[str, str] = field(default_factory=dict)   # conv path -> why it is not gateable
    input_size: Tuple[int, int, int] = (3, 224, 224)
    attention_macs: float = 0.0   # per sample at input_size: attention outside conv/linear modules (always dense)

    def to_dict(self) -> dict:
        # a CNN's plan is written as releases before MLP units wrote it (no kind, reader or attention_macs), so they
        # still read it
        units = [{k: v for k, v in asdict(u).items() if u.kind != "conv" or k not in ("kind", "reader", "partner")}
                 for u in self.units]
        d = {"units": units, "ops": [asdict(o) for o in self.ops], "rejected": self.rejected,
             "input_size": list(self.input_size)}
        if self.attention_macs:
            d["attention_macs"] = self.attention_macs
        return d

    @property
    def has_new_features(self) -> bool:
        """MLP units or attention products: what run format version 1 cannot hold."""
        return bool(self.attention_macs) or any(u.kind != "conv" for u in self.units)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        units = [Unit(**{**u, "kernel": tuple(u["kernel"])}) for u in d["units"]]
        return cls(units, [MacOp(**o) for o in d["ops"]], dict(d.get("rejected", {})), tuple(d["input_size"]),
                   float(d.get("attention_macs", 0.0)))


class _Recorder:
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


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    for o in out:
        if isinstance(o, torch.Tensor):
            return o
    raise TypeError("model returned no tensor")


def trace_plan(model: nn.Module, input_size: Tuple[int, int, int], *, gate_shortcuts: bool = False) -> Plan:
    """One hooked forward (and a shape-recording backward) at ``input_size`` → the model's gating Plan."""
    rec, handles, was_training = _Recorder(), [], model.training
    modules = dict(model.named_modules())
    try:
        model.eval()
        for name, m in modules.items():
            if name:
                handles.append(m.register_forward_pre_hook(rec.pre(name)))
                handles.append(m.register_forward_hook(rec.post(name)))
        p = next(model.parameters(), None)
        x = torch.randn(1, *input_size, device=p.device if p is not None else None, requires_grad=True)
        rec.input = x
        with torch.enable_grad():
            out = _first_tensor(model(x))
            nodes, consumers = _graph(out.grad_fn)
            # before the backward frees the saved tensors
            attn = _products_macs(nodes, _module_linear_nodes(modules, rec.calls))
            shapes = _node_shapes(nodes, out, x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    plan = _Analysis(model, modules, rec.calls, nodes, consumers, shapes, input_size, x, gate_shortcuts).plan()
    plan.attention_macs = float(attn)
    return plan


def attention_macs(model: nn.Module, input_size: Tuple[int, int, int]) -> float:
    """MACs per sample of attention computed outside conv/linear modules at ``input_size``: the products between
    activations (QKᵀ, AV) and projections applied functionally (``nn.MultiheadAttention``'s in- and out-projection,
    torchvision Swin's qkv). One forward of a single image, in eval mode, read off its autograd graph; the model is
    left as it was."""
    was, rec, handles = model.training, _Recorder(), []
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
            out = _first_tensor(model(x))
            if out.grad_fn is None:
                return 0.0
            return float(_products_macs(_graph(out.grad_fn)[0], _module_linear_nodes(modules, rec.calls)))
    finally:
        for h in handles:
            h.remove()
        model.train(was)


_PASS_THROUGH = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AddBackward0", "SqueezeBackward0",
                 "SqueezeBackward1", "UnsqueezeBackward0", "ExpandBackward0")


def _module_linear_nodes(modules: Dict[str, nn.Module], calls: Dict[str, List[dict]]) -> set:
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


def _products_macs(nodes, module_linear: set) -> int:
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


def _graph(root) -> Tuple[List[Any], Dict[Any, List[Any]]]:
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


def _node_shapes(nodes, out: torch.Tensor, x: torch.Tensor) -> Dict[Any, List[Optional[Tuple[int, ...]]]]:
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


class _Analysis:
    def __init__(self, model, modules, calls, nodes, consumers, shapes, input_size, x, gate_shortcuts):
        self.model, self.modules, self.calls = model, modules, calls
        self.nodes, self.consumers, self.shapes = nodes, consumers, shapes
        self.input_size, self.x, self.gate_shortcuts = input_size, x, gate_shortcuts
        self.node_ids = {n: i for i, n in enumerate(nodes)}
        self.unit_end_nodes: Dict[Any, Tuple[str, int]] = {}
        self.memo: Dict[Tuple[Any, int], Expr] = {}
        self.fixed_exprs: Dict[str, Expr] = {}
        self.from_image: Optional[set] = None
        # the Linear (called once) whose output each node is
        self.linear_outputs = {cs[0]["out"][0]: n for n, cs in calls.items()
                               if len(cs) == 1 and cs[0].get("out") and isinstance(modules[n], nn.Linear)}

    # -- helpers
    def _once(self, name: str) -> Optional[dict]:
        c = self.calls.get(name, [])
        return c[0] if len(c) == 1 and c[0].get("out") else None

    def _modules_reading(self, node) -> List[str]:
        return [n for n, cs in self.calls.items() for c in cs if c["in"] and c["in"][0] is node]

    def _reads_image(self, call: dict) -> bool:
        """Whether a module's input depends on the image: a positional encoding computed from constants or
        parameters alone has one value for every sample (and batch 1), so a per-sample mask cannot apply to it."""
        if call["in"] is None:
            return bool(call.get("in_is_input"))
        if self.from_image is None:
            leaf = next((n for n in self.nodes if type(n).__name__ == "AccumulateGrad" and n.variable is self.x), None)
            seen, stack = set(), [leaf] if leaf is not None else []
            while stack:
                n = stack.pop()
                if n not in seen:
                    seen.add(n)
                    stack.extend(self.consumers.get(n, []))
            self.from_image = seen
        return call["in"][0] in self.from_image

    def _width(self, node, nr: int) -> int:
        s = self.shapes.get(node, [None])
        s = s[nr] if nr < len(s) else None
        return int(s[1]) if s is not None and len(s) > 1 else 1

    # -- units
    def plan(self) -> Plan:
        units, rejected = [], {}
        feeds_param = self._ancestors_of_params()
        for name, m in self.modules.items():
            if not isinstance(m, nn.Conv2d):
                continue
            unit, why = self._unit(name, m, feeds_param)
            if unit is None:
                rejected[name] = why
            else:
                units.append(unit)
                self.unit_end_nodes[self._once(unit.end)["out"][0]] = (unit.name, unit.out_channels)
        glu: Dict[str, Optional[Unit]] = {}      # fc1 -> its gated MLP unit; a SwiGLU's second fc1 -> None
        for name, m in self.modules.items():
            u = self._glu_unit(name) if isinstance(m, nn.Linear) else None
            if u is not None:
                glu[u.name] = u
                if u.partner:
                    glu[u.partner] = None
        for name, m in self.modules.items():
            if name in glu:
                if glu[name] is not None:
                    units.append(glu[name])
                    self.fixed_exprs[glu[name].reader] = ["unit", name, glu[name].out_channels]
                continue
            if isinstance(m, nn.Linear):
                unit, why = self._mlp_unit(name, m)
                if unit is not None:
                    units.append(unit)
                    # fc2 reads exactly fc1's hidden units (channels last, which the dim-1 walk below cannot follow)
                    self.fixed_exprs[unit.reader] = ["unit", unit.name, unit.out_channels]
                elif why:
                    rejected[name] = why
        # Expressions need every unit's end node registered first, hence the second pass.
        units = [Unit(**{**asdict(u), "kernel": tuple(u.kernel), "in_expr": self._input_expr(u.name)}) for u in units]
        ops = []
        for name, m in self.modules.items():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or isinstance(m, nn.Linear):
                ncalls = len(self.calls.get(name, []))
                if ncalls == 0:
                    continue
                conv = not isinstance(m, nn.Linear)
                ops.append(MacOp(
                    name=name, kind="conv" if conv else "linear",
                    in_channels=m.in_channels if conv else m.in_features,
                    out_channels=m.out_channels if conv else m.out_features,
                    kernel_area=math.prod(m.kernel_size) if conv else 1,
                    groups=m.groups if conv else 1,
                    in_expr=self._input_expr(name) if ncalls == 1 else ["dense", m.in_channels if conv else m.in_features],
                    calls=ncalls))
        return Plan(units, ops, rejected, tuple(self.input_size))

    def _ancestors_of_params(self) -> set:
        """Nodes from which some conv/linear input is reachable: a unit ending elsewhere is a classifier."""
        seen = set()
        stack = [c["in"][0] for n, m in self.modules.items() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Conv1d))
                 for c in self.calls.get(n, []) if c["in"]]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack.extend(nx for nx, _ in n.next_functions if nx is not None)
        return seen

    def _unit(self, name: str, conv: nn.Conv2d, feeds_param: set) -> Tuple[Optional[Unit], str]:
        call = self._once(name)
        if call is None:
            return None, "called more than once (shared weights)" if self.calls.get(name) else "not used in forward"
        if not self._reads_image(call):
            return None, "its input does not depend on the image (a positional encoding): nothing per sample to gate"
        node, end, act = call["out"][0], name, None
        readers = self.consumers.get(node, [])
        norms = [n for n in self._modules_reading(node) if isinstance(self.modules[n], nn.modules.batchnorm._BatchNorm)]
        if len(readers) == 1 and len(norms) == 1 and self._once(norms[0]):
            end = norms[0]
            node = self._once(end)["out"][0]
            fused = getattr(self.modules[end], "act", None)   # timm BatchNormAct2d: norm + act in one module
            if fused is not None and not _zero_at_zero(fused, conv.out_channels):
                return None, f"its fused activation {type(fused).__name__} has f(0)≠0"
            if fused is not None:
                act = None
                node = None   # the fused module's output already includes the activation
        if node is not None:
            readers = self.consumers.get(node, [])
            acts = [n for n in self._modules_reading(node) if _is_activation(self.modules[n])]
            if len(readers) == 1 and acts:
                if not _zero_at_zero(self.modules[acts[0]], conv.out_channels):
                    return None, f"followed by {type(self.modules[acts[0]]).__name__}, which has f(0)≠0"
                act = acts[0]
            elif len(readers) == 1 and type(readers[0]).__name__ in ("ReluBackward0", "ReluBackward1"):
                act = "relu"
        end_node = self._once(end)["out"][0]
        out_shape = call.get("out_shape") or ()
        if out_shape and out_shape[0] != self.x.shape[0]:
            return None, _FOLDED
        if len(out_shape) == 4 and out_shape[2] * out_shape[3] == 1 and conv.kernel_size == (1, 1):
            # A 1×1 conv on a 1×1 map is a linear layer on a pooled vector (SE convs): its gate, GAP → Linear
            # with the same shape, would cost exactly as much as the conv it decides about.
            return None, "1×1 conv on a 1×1 map: its gate would cost as much as the conv"
        if end_node not in feeds_param:
            return None, "no conv or linear layer reads its output (a classifier conv)"
        shortcut = conv.kernel_size == (1, 1) and self._is_shortcut(call["in"][0] if call["in"] else None, end_node)
        if shortcut and not self.gate_shortcuts:
            return None, "1×1 shortcut conv (gate it with --gate-shortcuts)"
        return Unit(name, end, act, conv.in_channels, conv.out_channels, tuple(conv.kernel_size), conv.groups,
                    [], shortcut), ""

    def _mlp_unit(self, name: str, fc1: nn.Linear) -> Tuple[Optional[Unit], str]:
        """fc1 → activation (f(0)=0) → [dropout] → fc2 on tokens. Returns (None, "") for a Linear that is not the
        first layer of an MLP at all (qkv, proj, heads), so only MLP-like refusals are listed."""
        call = self._once(name)
        if call is None or not self._reads_image(call):
            return None, ""
        node, hidden = call["out"][0], fc1.out_features
        readers = self.consumers.get(node, [])
        if len(readers) != 1:
            return None, ""
        kind = type(readers[0]).__name__
        if kind in ("SplitBackward0", "SplitWithSizesBackward0", "ChunkBackward0", "SliceBackward0"):
            # a GLU multiplies one part by the activation of the other; a qkv projection's parts go elsewhere
            near = self.consumers.get(readers[0], [])
            near = near + [c for n in near for c in self.consumers.get(n, [])]
            if any(type(c).__name__ == "MulBackward0" for c in near):
                return None, ("its output is split into value and gate halves (a gated GLU MLP) whose product is not "
                              "read by one Linear alone (e.g. a norm over the hidden units couples them); not gated")
            return None, ""
        acts = [n for n in self._modules_reading(node)
                if _is_activation(self.modules[n]) and not isinstance(self.modules[n], nn.Identity) and self._once(n)]
        if acts:
            act: Optional[str] = acts[0]
            if not _zero_at_zero(self.modules[act], hidden):
                return None, f"followed by {type(self.modules[act]).__name__}, which has f(0)≠0"
            act_node = self._once(act)["out"][0]
        elif kind in _FUNCTIONAL_ACTS:
            act, act_node = _FUNCTIONAL_ACTS[kind], readers[0]
        else:
            return None, ""
        after = self.consumers.get(act_node, [])
        fc2 = [n for n in self._modules_reading(act_node) if isinstance(self.modules[n], nn.Linear)]
        if len(after) != 1 or len(fc2) != 1:
            if any(type(a).__name__ == "MulBackward0" for a in after):
                return None, ("its activation is multiplied by another branch (a gated GLU/SwiGLU MLP) whose product "
                              "is not read by one Linear alone (e.g. a norm over the hidden units couples them); not gated")
            return None, "its activation is not read by exactly one Linear"
        reader = fc2[0]
        if self._once(reader) is None or self.modules[reader].in_features != hidden:
            return None, f"{reader} is called more than once or does not read {hidden} features"
        shape = call.get("out_shape") or ()
        if shape and shape[0] != self.x.shape[0]:
            return None, _FOLDED
        if len(shape) < 3 or math.prod(shape[1:-1]) == 1:
            # on one vector per sample (a classifier MLP) the gate, Linear(C_in → hidden), costs as much as fc1
            return None, "a Linear on one vector per sample: its gate would cost as much as the layer"
        return Unit(name, name, act, fc1.in_features, hidden, (1, 1), 1, [], kind="mlp", reader=reader), ""

    def _glu_unit(self, name: str) -> Optional[Unit]:
        """A gated MLP whose fc2 is ``name``: fc2 reads (through copies) only act(g) · x, where g and x are the two
        halves of one fc1 (``chunk``) or two Linears on the same input, and act is elementwise."""
        call = self._once(name)
        if call is None or not call["in"]:
            return None
        node, _ = call["in"]
        while type(node).__name__ in _COPIES and len(self.consumers.get(node, [])) == 1:
            node = node.next_functions[0][0]
        if type(node).__name__ != "MulBackward0" or len(self.consumers.get(node, [])) != 1:
            return None
        ins = self._inputs(node)
        if len(ins) != 2 or None in ins:
            return None
        sides = [self._glu_side(n, k, node) for n, k in ins]
        if None in sides or sorted(s[2] for s in sides) != [False, True]:     # exactly one side activated
            return None
        (x_lin, x_half, _), (g_lin, g_half, _) = sorted(sides, key=lambda s: s[2])
        hidden = self.modules[name].in_features
        fc1, fc1_call = self.modules[x_lin], self._once(x_lin)
        if x_lin == g_lin:                       # one fc1, chunked into two halves
            if x_half == g_half or x_half is None or fc1.out_features != 2 * hidden:
                return None
            partner = None
        else:                                    # two Linears on the same input, each of width hidden
            g_call = self._once(g_lin)
            if (x_half is not None or g_half is not None or g_call["in"] != fc1_call["in"]
                    or {fc1.out_features, self.modules[g_lin].out_features} != {hidden}):
                return None
            partner = g_lin
        shape = fc1_call.get("out_shape") or ()
        if (not self._reads_image(fc1_call) or len(shape) < 3 or shape[0] != self.x.shape[0]
                or math.prod(shape[1:-1]) == 1):
            return None
        return Unit(x_lin, name, None, fc1.in_features, hidden, (1, 1), 1, [], kind="glu", reader=name,
                    partner=partner)

    def _glu_side(self, node, nr: int, mul) -> Optional[Tuple[str, Optional[int], bool]]:
        """One operand of a GLU product: (the Linear it comes from, which chunk of its output or None, activated)."""
        activated = type(node).__name__ in _ELEMENTWISE
        if activated:
            if self.consumers.get(node, []) != [mul] or node.next_functions[0][0] is None:
                return None
            node, nr = node.next_functions[0]
        half = None
        if type(node).__name__ in ("SplitBackward0", "SplitWithSizesBackward0"):
            shape = self.shapes.get(node.next_functions[0][0], [None])[node.next_functions[0][1]]
            if shape is None or _saved_dim(node) % len(shape) != len(shape) - 1 or len(self.consumers.get(node, [])) != 2:
                return None
            half, node = nr, node.next_functions[0][0]
        lin = self.linear_outputs.get(node)
        if lin is None or len(self.consumers.get(node, [])) != 1:
            return None
        return lin, half, activated

    def _is_shortcut(self, in_node, end_node) -> bool:
        """Reads a branch point (maybe through pooling, as in ResNet-D) and feeds a sum directly."""
        feeds_add = any(type(c).__name__.startswith("AddBackward") for c in self.consumers.get(end_node, []))
        p = in_node
        while p is not None and type(p).__name__.startswith(("AvgPool", "MaxPool")) and len(self.consumers.get(p, [])) == 1:
            p = next((nx for nx, _ in p.next_functions if nx is not None), None)
        branches = p is None or len(self.consumers.get(p, [])) >= 2
        return feeds_add and branches

    # -- sparsity expressions
    def _input_expr(self, name: str) -> Expr:
        if name in self.fixed_exprs:
            return self.fixed_exprs[name]
        call = self.calls[name][0]
        m = self.modules[name]
        width = m.in_features if isinstance(m, nn.Linear) else m.in_channels
        if not call["in"] or (isinstance(m, nn.Linear) and len(call.get("in_shape") or ()) > 2):
            return ["dense", width]      # channels last: the walk below follows dim 1 only
        old = sys.getrecursionlimit()
        sys.setrecursionlimit(max(old, 20000))
        try:
            e = self._expr(*call["in"])
        finally:
            sys.setrecursionlimit(old)
        return e if expr_width(e) == width else ["dense", width]

    def _expr(self, node, nr: int) -> Expr:
        key = (node, nr)
        if key not in self.memo:
            self.memo[key] = _simplify(self._expr_uncached(node, nr))
        return self.memo[key]

    def _inputs(self, node) -> List[Optional[Tuple[Any, int]]]:
        return [(nx, i) if nx is not None else None for nx, i in node.next_functions]

    def _expr_uncached(self, node, nr: int) -> Expr:
        if node in self.unit_end_nodes:
            return ["unit", *self.unit_end_nodes[node]]
        kind = type(node).__name__
        width = self._width(node, nr)
        dense = ["dense", width]
        ins = self._inputs(node)
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
            dim = _saved_dim(node)
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
            dim = _saved_dim(node) % len(parent_shape)
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


def _saved_dim(node) -> int:
    """A node's saved ``dim`` as a signed int (autograd exposes dim=-1 as 2**64 - 1)."""
    d = int(getattr(node, "_saved_dim", 0))
    return d - (1 << 64) if d >= 1 << 63 else d


def expr_width(e: Expr) -> int:
    """Channel count of the tensor an expression describes."""
    k = e[0]
    if k == "dense":
        return int(e[1])
    if k == "unit":
        return int(e[2])
    if k == "cat":
        return sum(expr_width(t) for t in e[1])
    if k == "slice":
        return int(e[3]) - int(e[2])
    if k in ("any", "all"):
        return expr_width(e[1][0])
    if k == "repeat":
        return expr_width(e[1]) * int(e[2])
    raise ValueError(e)


def _simplify(e: Expr) -> Expr:
    k = e[0]
    if k == "any":
        terms = e[1]
        if any(t[0] == "dense" for t in terms):
            return ["dense", expr_width(terms[0])]
        return terms[0] if len(terms) == 1 else e
    if k == "all":
        terms = [t for t in e[1] if t[0] != "dense"]
        if not terms:
            return e[1][0]
        return terms[0] if len(terms) == 1 else ["all", terms]
    if k == "cat":
        if all(t[0] == "dense" for t in e[1]):
            return ["dense", sum(int(t[1]) for t in e[1])]
    if k == "slice" and e[1][0] == "dense":
        return ["dense", int(e[3]) - int(e[2])]
    if k == "repeat" and e[1][0] == "dense":
        return ["dense", int(e[1][1]) * int(e[2])]
    return e
