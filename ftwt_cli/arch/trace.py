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
* residual-stream units (``kind="stream"``, only when asked: ``residual_stream``): a module (a residual block) whose
  output is a sum — then, optionally, one elementwise activation — of its own input (an identity shortcut) and of
  conv outputs (through a BatchNorm each) read by nothing else: a ResNet BasicBlock or Bottleneck. The mask goes on
  the block's output, after the add (FTWT's ``--gtafterblock``), so the next block's convs read a sparse input; the
  gate reads the block's input; the convs feeding the sum (``Unit.computes``: the branch's last conv, a shortcut
  conv) need only the kept filters, and stop being units of their own.
* attention outside conv/linear modules (``attention.attention_macs``) and, for every conv/linear and gate, the
  sparsity expression of its input (``sparsity``), both read off the same graph.

The plan's types are in ``plan``, the graph walk in ``graph``. The caller's model is left as it was: hooks are
removed in ``finally`` and the train flag is restored.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .attention import attention_macs, module_linear_nodes, products_macs
from .graph import Recorder, first_tensor, graph, node_shapes, saved_dim
from .plan import Expr, MacOp, Plan, Unit, expr_width
from .sparsity import Sparsity, inputs

# Plan, Unit, MacOp, Expr, expr_width and attention_macs are re-exported: the tracer is where callers look for them
__all__ = ["Unit", "MacOp", "Plan", "trace_plan", "follow_depthwise", "attention_macs", "Expr", "expr_width"]

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


def trace_plan(model: nn.Module, input_size: Tuple[int, int, int], *, gate_shortcuts: bool = False,
               depthwise_follow: bool = False, residual_stream: bool = False) -> Plan:
    """One hooked forward (and a shape-recording backward) at ``input_size`` → the model's gating Plan.
    ``depthwise_follow``: a depthwise conv unit that reads exactly another conv unit's output follows that unit's mask
    instead of having a gate (``Unit.follows``). ``residual_stream``: every residual block's output is a unit (its
    mask after the add), in place of the convs that feed its sum."""
    rec, handles, was_training = Recorder(), [], model.training
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
            out = first_tensor(model(x))
            nodes, consumers = graph(out.grad_fn)
            # before the backward frees the saved tensors
            attn = products_macs(nodes, module_linear_nodes(modules, rec.calls))
            shapes = node_shapes(nodes, out, x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    plan = _Analysis(model, modules, rec.calls, nodes, consumers, shapes, input_size, x, gate_shortcuts,
                     residual_stream).plan()
    plan.attention_macs = float(attn)
    if depthwise_follow:
        plan.units = follow_depthwise(plan.units)
    return plan


def follow_depthwise(units: List[Unit]) -> List[Unit]:
    """Each depthwise conv unit (groups = C_in = C_out) whose input is exactly another conv unit's whole output (the
    expansion of an inverted residual) follows that unit: its channel j runs iff the producer's channel j does."""
    convs = {u.name: u for u in units if u.kind == "conv"}
    out = []
    for u in units:
        e = u.in_expr
        if (u.kind == "conv" and u.groups == u.in_channels == u.out_channels and e and e[0] == "unit" and e[1] in convs
                and int(e[2]) == u.in_channels == convs[e[1]].out_channels):
            u = Unit(**{**asdict(u), "kernel": tuple(u.kernel), "follows": e[1]})
        out.append(u)
    return out


class _Analysis:
    """Finds the gateable units of one traced graph and assembles its Plan."""

    def __init__(self, model, modules, calls, nodes, consumers, shapes, input_size, x, gate_shortcuts,
                 residual_stream=False):
        self.model, self.modules, self.calls = model, modules, calls
        self.nodes, self.consumers, self.shapes = nodes, consumers, shapes
        self.input_size, self.x, self.gate_shortcuts = input_size, x, gate_shortcuts
        self.residual_stream = residual_stream
        self.node_ids = {n: i for i, n in enumerate(nodes)}
        self.sparsity = Sparsity(modules, calls, shapes, x)
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
        if self.residual_stream:
            streams = self._stream_units()
            fed = {n for u in streams for n in u.computes}
            units = [u for u in units if u.name not in fed] + streams
            rejected.update({n: "feeds a residual sum, whose output is gated (--residual-stream)" for n in fed})
        for unit in units:
            self.sparsity.unit_ends[self._once(unit.end)["out"][0]] = (unit.name, unit.out_channels)
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
                    self.sparsity.fixed[glu[name].reader] = ["unit", name, glu[name].out_channels]
                continue
            if isinstance(m, nn.Linear):
                unit, why = self._mlp_unit(name, m)
                if unit is not None:
                    units.append(unit)
                    # fc2 reads exactly fc1's hidden units (channels last, which the dim-1 walk below cannot follow)
                    self.sparsity.fixed[unit.reader] = ["unit", unit.name, unit.out_channels]
                elif why:
                    rejected[name] = why
        # Expressions need every unit's end node registered first, hence the second pass.
        units = [Unit(**{**asdict(u), "kernel": tuple(u.kernel), "in_expr": self._in_expr(u)}) for u in units]
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
                    in_expr=self.sparsity.input_expr(name) if ncalls == 1 else ["dense", m.in_channels if conv else m.in_features],
                    calls=ncalls))
        return Plan(units, ops, rejected, tuple(self.input_size))

    def _in_expr(self, u: Unit) -> Expr:
        if u.kind == "stream":       # a block, not a conv: the expression of the tensor it reads
            return self.sparsity.tensor_expr(self._once(u.name)["in"], u.in_channels)
        return self.sparsity.input_expr(u.name)

    # -- residual-stream units
    def _stream_units(self) -> List[Unit]:
        """One unit per residual block: the innermost module whose output is act(input + branch) or
        act(shortcut conv + branch), every term of the sum an identity or a conv (+ norm) read by nothing else."""
        by_out: Dict[Any, List[str]] = {}
        for name, cs in self.calls.items():
            if name and len(cs) == 1 and cs[0].get("out"):
                by_out.setdefault(cs[0]["out"], []).append(name)
        found: Dict[Any, Unit] = {}
        for name in self.modules:
            call = self._once(name)
            if not name or call is None or not call["in"] or isinstance(self.modules[name], (nn.Conv2d, nn.Linear)):
                continue
            feeds = self._residual_sum(call, by_out)
            shape, in_shape = call.get("out_shape") or (), call.get("in_shape") or ()
            if (feeds is None or len(shape) != 4 or len(in_shape) != 4 or shape[0] != self.x.shape[0]
                    or any(not c.startswith(name + ".") for c, _ in feeds)):
                continue
            key = call["out"]
            if key in found and len(found[key].name) > len(name):     # the innermost module holding the sum
                continue
            found[key] = Unit(name, name, None, int(in_shape[1]), int(shape[1]), (1, 1), 1, [], kind="stream",
                              computes=tuple(c for c, _ in feeds), computes_ends=tuple(e for _, e in feeds))
        return list(found.values())

    def _residual_sum(self, call: dict, by_out: Dict[Any, List[str]]) -> Optional[List[Tuple[str, str]]]:
        """The (conv, its norm or itself) pairs feeding a module's output sum (identity terms: its own input), or
        None if its output is not such a sum."""
        node, nr = call["out"]
        if type(node).__name__ in _ELEMENTWISE or type(node).__name__ in ("HardtanhBackward1", "ReluBackward1"):
            ins = [i for i in inputs(node) if i is not None]
            if len(ins) != 1 or len(self.consumers.get(ins[0][0], [])) != 1:
                return None
            node, nr = ins[0]
        if not type(node).__name__.startswith("AddBackward"):
            return None
        terms = inputs(node)
        if len(terms) != 2 or None in terms:
            return None
        convs, identity = [], 0
        for t in terms:
            if t == call["in"]:
                identity += 1
                continue
            conv = self._sole_conv(t, node, by_out)
            if conv is None:
                return None
            convs.append(conv)
        return convs if convs and identity <= 1 else None

    def _sole_conv(self, term: Tuple[Any, int], add, by_out: Dict[Any, List[str]]) -> Optional[Tuple[str, str]]:
        """(the Conv2d, its BatchNorm or the conv itself) whose output (through the norm, maybe with its fused
        activation) is ``term`` and is read by nothing but ``add``."""
        if self.consumers.get(term[0], []) != [add]:
            return None
        names = by_out.get(term, [])
        norm = next((n for n in names if isinstance(self.modules[n], nn.modules.batchnorm._BatchNorm)), None)
        if norm is not None:
            term = self._once(norm)["in"]
            if term is None or len(self.consumers.get(term[0], [])) != 1:
                return None
            names = by_out.get(term, [])
        conv = next((n for n in names if isinstance(self.modules[n], nn.Conv2d)), None)
        return None if conv is None else (conv, norm or conv)

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
        ins = inputs(node)
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
            if shape is None or saved_dim(node) % len(shape) != len(shape) - 1 or len(self.consumers.get(node, [])) != 2:
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
