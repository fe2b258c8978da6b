"""GatedModel: a backbone with one decision gate per gated conv, driven by hooks.

The backbone is left structurally untouched (its state-dict keys stay the source checkpoint's, under
``backbone.``); hooks do the work:
* a forward pre-hook on each gated conv runs its gate on the conv's input: GAP → Linear(C_in → C_out);
* a forward hook on the unit's end module (the BatchNorm after the conv, or the conv itself) computes the
  mask — from the gate (``predict``), from the heatmap-mass rule on this very output (``oracle``), or none
  (``open``) — and multiplies it in, so the activation that follows sees exact zeros;
* a forward hook on every conv/linear records its output size for the MACs count.
Hooks are callable objects, not closures, so ``copy.deepcopy(model)`` yields an independent, working copy.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dataflow import Plan, Unit
from .errors import FtwtError
from .groundtruth import GT_RULES, check_r, ground_truth, ground_truth_many
from .macs import MacsBreakdown, MacsPlan, count_macs
from .sidebyside import FlatBuffers, Layout, SideBySide

__all__ = ["Gate", "GatedModel", "ForwardStats", "GATE_MODES", "gate_key", "bool_to", "gate_linear"]

GATE_MODES = ("open", "predict", "oracle")
# Activations that are monotone (non-decreasing): max |f(y)| over a map sits at the map's min or max.
_MONOTONE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.ELU, nn.Tanh, nn.Identity)
# Gates start open: zero weights and a positive bias give sigmoid(3) ≈ 0.95 > 0.5 for every channel.
_INIT_LOGIT = 3.0


def bool_to(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``mask.to(dtype)``, reading a bool tensor as uint8 first: the same values, but torch's CPU conversion
    from bool is not vectorised and takes 5× longer (measured on a (128, 3904) mask: 85 against 15 µs)."""
    return (mask.view(torch.uint8) if mask.dtype == torch.bool else mask).to(dtype)


# oneDNN's float32 inner product, where this torch build has it: a private op (inductor's CPU linear), so looked up
# softly; without it every product goes to torch's addmm.
_DNNL_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
# Below about this many multiply-adds (batch · C_in · C_out), addmm's lower call overhead wins (measured on CPU).
_DNNL_MIN_MACS = 1 << 23


def gate_linear(p: torch.Tensor, w: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """p @ wᵀ + b: a gate's logits from its pooled input (``F.linear``), a new tensor or ``out``.

    On x86 CPUs torch hands float32 products to MKL, whose sgemm runs AVX2 code on AMD CPUs; oneDNN's inner
    product uses AVX-512 there and takes half the time for the gates' larger shapes (measured at batch 128 on a
    2-core EPYC: 512 × 512 in 176 against 332 µs, 256 × 256 in 51 against 83 µs). Only where nothing needs a
    gradient (the op has no autograd formula), the product is big enough, and no tracer or compiler records the
    call; both give the same float32 logits to rounding (~1e−6), and every gradient-free caller (fit-gates,
    evaluation, the compact runtime) goes through here."""
    if (_DNNL_LINEAR is not None
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling()      # traced graphs stay portable
            and p.device.type == "cpu" and p.dtype == w.dtype == torch.float32
            and p.dim() == 2 and p.shape[0] * w.shape[0] * w.shape[1] >= _DNNL_MIN_MACS
            and torch._C._get_mkldnn_enabled()
            and not (torch.is_grad_enabled() and (p.requires_grad or w.requires_grad or b.requires_grad))):
        y = _DNNL_LINEAR(p, w, b, "none", [], "")
        return y if out is None else out.copy_(y)
    return torch.addmm(b, p, w.t(), out=out) if out is not None else F.linear(p, w, b)


# max |y| over maps of at most this many positions: |y| into a copy, then one max per map, rather than a max and a min
# pass over y (measured on CPU at batch 128: 2×2 maps 45 against 85 µs, 4×4 68 against 120, 8×8 48 against 57; at
# 16×16 the copy costs more, 138 against 115).
_ABS_FIRST_MAX_HW = 64


def _over_maps(x: torch.Tensor, reduce: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, C) mean/amax/amin of each (H, W) map, a new tensor or ``out``. Small maps take a detour, measured on CPU
    for ResNet-18's maps at 32 px (batch 128): a 1×1 map is copied (a reduction over one element costs 3-5× a
    copy); a 2×2 map's mean is a matrix-vector product with 1/4s (33 against 58 µs for (128, 256, 2, 2)); a
    4×4 map's max/min first halves it twice elementwise (a row reduction over exactly 16 floats takes 2× as
    long as one over 4: 122 against 58 µs for (128, 128, 4, 4))."""
    b, c, hw = x.shape[0], x.shape[1], x.shape[2] * x.shape[3]
    if hw == 1:
        return x.reshape(b, c).clone() if out is None else out.copy_(x.reshape(b, c))
    if hw == 4 and reduce == "mean":
        return torch.mv(x.reshape(b * c, 4), x.new_full((4,), 0.25), out=None if out is None else out.view(-1)).view(b, c)
    if hw == 16 and reduce in ("amax", "amin"):
        pick = torch.maximum if reduce == "amax" else torch.minimum
        v = x.reshape(b * c, 16)
        v = pick(v[:, :8], v[:, 8:])
        return getattr(torch, reduce)(pick(v[:, :4], v[:, 4:]), 1, out=None if out is None else out.view(-1)).view(b, c)
    return getattr(torch, reduce)(x, dim=(2, 3), out=out) if out is not None else getattr(x, reduce)(dim=(2, 3))


def gate_key(unit_name: str) -> str:
    """ModuleDict keys may not contain dots."""
    return unit_name.replace(".", "__")


class Gate(nn.Module):
    """FTWT's decision gate: global average pool of the conv's input, then a linear layer with bias."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, out_channels)
        nn.init.zeros_(self.fc.weight)
        nn.init.constant_(self.fc.bias, _INIT_LOGIT)

    @staticmethod
    def pool(x: torch.Tensor) -> torch.Tensor:
        return _over_maps(x, "mean")

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """``self.fc(pooled)``, through ``gate_linear``."""
        return gate_linear(pooled, self.fc.weight, self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.pool(x))


@dataclass(frozen=True)
class ForwardStats:
    """What the last forward did, per sample."""
    macs: torch.Tensor                  # (B,) float64 MACs, gates included
    gate_macs: torch.Tensor             # (B,) float64
    dense_macs: float                   # MACs of the source model at this input size
    masks: Dict[str, torch.Tensor]      # gated layer -> (B, C_out) bool (empty when gates are open)
    per_layer: Dict[str, torch.Tensor] = field(default_factory=dict)   # conv/linear -> (B,) MACs


@dataclass
class _ForwardState:
    logits: Dict[str, torch.Tensor] = field(default_factory=dict)
    masks: Dict[str, torch.Tensor] = field(default_factory=dict)
    targets: Dict[str, torch.Tensor] = field(default_factory=dict)
    pooled: Dict[str, torch.Tensor] = field(default_factory=dict)    # gate inputs after GAP (frozen backbone)
    scores: Dict[str, torch.Tensor] = field(default_factory=dict)    # ranked into targets when first asked
    rule: tuple = (0.95, "mass")                                       # (r, gt) the forward ran with
    positions: Dict[str, int] = field(default_factory=dict)
    side: Optional[SideBySide] = None                                  # side_by_side(), once per forward
    flat: Optional[FlatBuffers] = None                                 # predict mode: hooks write here directly


class _GateHook:
    def __init__(self, owner: "GatedModel", unit: Unit) -> None:
        self.owner, self.unit, self.key = owner, unit, gate_key(unit.name)

    def __call__(self, module: nn.Module, args) -> None:
        g = self.owner
        if g.mode == "predict" or g.collect_targets:
            x, gate, st = args[0], g.gates[self.key], g._state
            if g.frozen_backbone:       # no autograd at all: fit-gates computes the gates' gradients in closed form
                name, w = self.unit.name, gate.fc.weight
                st.pooled[name] = p = gate.pool(x)
                dest = st.flat.slot("logits", name, p, w.dtype) if st.flat is not None else None
                # gate.fc without the module call, written straight into the flat buffer
                st.logits[name] = gate_linear(p, w, gate.fc.bias, out=dest)
            else:
                st.logits[self.unit.name] = gate(x.detach() if g.decoupled else x)


class _MaskHook:
    def __init__(self, owner: "GatedModel", unit: Unit) -> None:
        self.owner, self.unit = owner, unit
        self._act: Optional[nn.Module] = None    # the activation module, looked up on first use (see _scores)

    def _scores(self, out: torch.Tensor, dest: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, C) spatial max of |activation(unit output)|: what the ground truth ranks channels by (into ``dest``).

        For a monotone activation f the maximum of |f(y)| over a map is reached where y is largest or smallest,
        so f on the (B, C) spatial max and min gives it exactly, without touching the full tensor again; for a
        non-negative one (ReLU) the max alone suffices. (Separate amax/amin passes: ``aminmax`` over the
        flattened maps measured 15× slower on CPU; without an activation, small maps take max |y| over a copy,
        see ``_ABS_FIRST_MAX_HW``.) Other activations (SiLU, GELU, ...) run on a copy."""
        act = self.unit.act
        if act not in (None, "relu") and self._act is None:     # resolved once: hooks run on every forward
            self._act = self.owner.backbone.get_submodule(act)
        module = self._act
        if act is None:                                      # max |y|
            hw = out.shape[2] * out.shape[3]
            if hw == 1:
                return torch.abs(out.reshape(out.shape[0], out.shape[1]), out=dest)
            if hw <= _ABS_FIRST_MAX_HW:                      # small maps: |y| first, then one reduction
                return _over_maps(out.abs(), "amax", dest)
            return torch.maximum(_over_maps(out, "amax"), _over_maps(out, "amin").neg_(), out=dest)   # max(max y, -min y)
        if act == "relu" or isinstance(module, nn.ReLU):
            return _over_maps(out, "amax", dest).relu_()
        if isinstance(module, nn.ReLU6):
            s = module(_over_maps(out, "amax"))
        elif isinstance(module, _MONOTONE):
            s = torch.maximum(module(_over_maps(out, "amax")).abs(), module(_over_maps(out, "amin")).abs())
        else:
            s = module(out.clone()).abs().amax(dim=(2, 3))
        return s if dest is None else dest.copy_(s)

    def __call__(self, module: nn.Module, args, out: torch.Tensor):
        g, name = self.owner, self.unit.name
        target = None
        if g.mode == "oracle":                   # the target is this layer's mask: rank now
            with torch.no_grad():
                target = ground_truth(self._scores(out.detach()), g.r, g.gt)
            g._state.targets[name] = target
        elif g.collect_targets:                  # only the loss needs it: rank after the forward (see last_targets)
            st = g._state
            with torch.no_grad():
                dest = st.flat.slot("scores", name, out) if st.flat is not None else None
                st.scores[name] = self._scores(out.detach(), dest)
        if g.mode == "open":
            return None
        if g.mode == "predict":
            st = g._state
            if g.forced_masks is not None:
                mask = g.forced_masks[name]
            else:
                logits = st.logits[name]
                dest = st.flat.slot("masks", name, logits, torch.bool) if st.flat is not None else None
                mask = torch.gt(logits.detach(), 0, out=dest) if dest is not None else logits > 0
        else:
            mask = target
        g._state.masks[name] = mask
        m = bool_to(mask, out.dtype).view(mask.shape[0], mask.shape[1], 1, 1)
        if not out.requires_grad and out.data_ptr() != args[0].data_ptr():
            return out.mul_(m)     # nothing differentiates through it and no one else holds it: save a copy
        return out * m


class _PositionHook:
    def __init__(self, owner: "GatedModel", name: str, kind: str, out_features: int) -> None:
        self.owner, self.name, self.kind, self.out_features = owner, name, kind, out_features

    def __call__(self, module: nn.Module, args, out: torch.Tensor) -> None:
        # conv: H_out·W_out; linear: tokens per sample (1 for a (B, F) input). From the shape: indexing the
        # tensor would create views on every forward.
        n = math.prod(out.shape[2:]) if self.kind == "conv" else math.prod(out.shape[1:]) // self.out_features
        pos = self.owner._state.positions
        pos[self.name] = pos.get(self.name, 0) + int(n)


class GatedModel(nn.Module):
    """A backbone with decision gates. ``set_gates`` picks how masks are made; ``last_stats`` reports."""

    def __init__(self, backbone: nn.Module, plan: Plan, gated: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.plan = plan
        names = [u.name for u in plan.units] if gated is None else list(gated)
        by_name = {u.name: u for u in plan.units}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise FtwtError(f"not gateable: {', '.join(unknown[:3])}", "choose layers from the attach table")
        self.units: List[Unit] = [by_name[n] for n in names]
        self.gates = nn.ModuleDict({gate_key(u.name): Gate(u.in_channels, u.out_channels) for u in self.units})
        self._layout = Layout.of([u.name for u in self.units], [u.out_channels for u in self.units])
        self.mode, self.r, self.gt = "open", 0.95, "mass"
        self.decoupled = True          # the gate reads a detached input: the task loss never reaches it
        self.collect_targets = False   # also compute ground-truth masks (for the BCE loss) while predicting
        self.forced_masks: Optional[Dict[str, torch.Tensor]] = None   # replay fixed masks (gates still run)
        # fit-gates: the whole forward runs without autograd (nothing to record); the gates' inputs after
        # pooling are kept in ``last_pooled`` so that ``train.gate_grads`` can compute their gradients directly
        self.frozen_backbone = False
        self.meta: dict = {}           # what the run/export knows (architecture, source, history, ...)
        self.data_config = None        # archs.DataConfig once loaded from a run
        self._state = _ForwardState()
        self._last: Optional[tuple] = None          # (state, batch, size, gates ran) of the last forward
        self._last_stats: Optional[ForwardStats] = None
        self._dense_cache: Dict[tuple, float] = {}
        self._macs_plans: Dict[tuple, MacsPlan] = {}
        self._install_hooks()

    def _install_hooks(self) -> None:
        mods = dict(self.backbone.named_modules())
        for u in self.units:
            mods[u.name].register_forward_pre_hook(_GateHook(self, u))
            mods[u.end].register_forward_hook(_MaskHook(self, u))
        for op in self.plan.ops:
            mods[op.name].register_forward_hook(_PositionHook(self, op.name, op.kind, op.out_channels))

    # ------------------------------------------------------------------ control
    def set_gates(self, mode: str, r: Optional[float] = None, gt: Optional[str] = None) -> "GatedModel":
        """``open``: every filter runs. ``predict``: the gates decide. ``oracle``: the ground-truth rule
        (``gt``, default heatmap mass) at ``r`` on this very input decides."""
        if mode not in GATE_MODES:
            raise FtwtError(f"unknown gate mode '{mode}'", f"use one of {', '.join(GATE_MODES)}")
        if gt is not None and gt not in GT_RULES:
            raise FtwtError(f"unknown ground-truth rule '{gt}'", f"use one of {', '.join(GT_RULES)}")
        if r is not None:
            self.r = check_r(r)
        if gt is not None:
            self.gt = gt
        self.mode = mode
        return self

    @property
    def gated_names(self) -> List[str]:
        return [u.name for u in self.units]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor):
        self._state = _ForwardState(rule=(self.r, self.gt))
        if self.mode == "predict":
            self._state.flat = FlatBuffers.new(self._layout, x.shape[0])
        with torch.no_grad() if self.frozen_backbone else nullcontext():
            out = self.backbone(x)
        # MACs are counted when someone asks (last_stats), not on every forward: inference pays nothing for them.
        self._last, self._last_stats = (self._state, x.shape[0], tuple(x.shape[1:]), self.mode != "open"), None
        return out

    @property
    def last_stats(self) -> Optional[ForwardStats]:
        """Per-sample MACs and masks of the last forward (computed on first access)."""
        if self._last_stats is None and self._last is not None:
            self._last_stats = self._stats(*self._last)
        return self._last_stats

    @property
    def last_logits(self) -> Dict[str, torch.Tensor]:
        return self._state.logits

    @property
    def last_pooled(self) -> Dict[str, torch.Tensor]:
        return self._state.pooled

    @property
    def last_targets(self) -> Dict[str, torch.Tensor]:
        """Ground-truth masks of the last forward (``collect_targets`` or ``oracle`` mode).

        While predicting, the hooks keep only each layer's (B, C) scores and the ranking runs here, after the
        forward, so its dozen small operations per layer do not run between convolutions that have just
        filled the cache (profiled on CPU, the same ranking took 2-3× longer per call inside the forward)."""
        st = self._state
        if st.scores:
            r, gt = st.rule
            flat = st.flat.complete("scores") if st.flat is not None else None
            if flat is not None:                 # every layer's scores in one buffer: rank each width's rows at once
                lay, b = st.flat.layout, st.flat.batch
                keep = [ground_truth(lay.group(flat, i, b), r, gt).view(-1) for i in range(len(lay.groups))]
                t = keep[0] if len(keep) == 1 else torch.cat(keep)
                st.flat.put("targets", t)
                st.targets.update((n, lay.block(t, i, b)) for i, n in enumerate(lay.names))
            else:
                st.targets.update(ground_truth_many(st.scores, r, gt))
            st.scores = {}
        return st.targets

    def side_by_side(self) -> SideBySide:
        """The layers with ground truth, with their gate logits, ground truth and masks side by side (flat, layer
        blocks in ``sidebyside.Layout`` order). Straight from the hooks' buffers when every layer wrote its
        block, else concatenated. Computed once per forward: the loss and the progress metrics share it."""
        st = self._state
        if st.side is None:
            targets = self.last_targets
            names = [n for n in self._layout.names if n in targets]
            fl = st.flat

            def flat(kind: str, parts: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
                whole = fl.complete(kind) if fl is not None and len(names) == len(self._layout.names) else None
                if whole is not None:
                    return whole
                if not all(n in parts for n in names):
                    return None
                return torch.cat([parts[n].reshape(-1) for n in names])

            lay = self._layout                   # or the same order restricted to the layers that ran
            if len(names) != len(lay.names):
                lay = Layout.of(names, [targets[n].shape[1] for n in names])
            b = targets[names[0]].shape[0] if names else 0
            st.side = SideBySide(lay, b, flat("logits", st.logits), flat("targets", targets), flat("masks", st.masks), fl)
        return st.side

    def _stats(self, st: _ForwardState, batch: int, size: tuple, gates_run: bool) -> ForwardStats:
        masks = {k: v.detach() for k, v in st.masks.items()}
        n = st.flat.sample_counts("masks") if st.flat is not None else None
        # every mask in one buffer: counted per width, not per layer
        counts = dict(zip(st.flat.layout.names, n.unbind(0))) if n is not None else None
        key = (frozenset(masks), tuple(sorted(st.positions.items())), batch, gates_run)
        plan = self._macs_plans.get(key)
        if plan is None:                         # the op walk, once per set of masks (see MacsPlan)
            if len(self._macs_plans) > 64:
                self._macs_plans.clear()
            plan = self._macs_plans[key] = MacsPlan.build(self.plan.ops, self.units, masks, st.positions, batch,
                                                          gates_run=gates_run)
        b = plan.run(masks, counts)
        if size not in self._dense_cache:
            self._dense_cache[size] = float(count_macs(self.plan.ops, self.units, {}, st.positions, 1, gates_run=False).total[0])
        return ForwardStats(b.total, b.gates, self._dense_cache[size], masks, b.per_op)

    def dense_macs(self, input_size: Optional[tuple] = None) -> MacsBreakdown:
        """MACs of the source model (gates open, no gate cost) at ``input_size`` (default: the plan's)."""
        size = tuple(input_size or self.plan.input_size)
        mode, self.mode = self.mode, "open"
        try:
            with torch.no_grad():
                p = next(self.backbone.parameters())
                was = self.training
                self.eval()
                self(torch.zeros(1, *size, dtype=p.dtype, device=p.device))
                self.train(was)
        finally:
            self.mode = mode
        st = self._state
        return count_macs(self.plan.ops, self.units, {}, st.positions, 1, gates_run=False)

    def gate_macs_dense(self) -> int:
        """Cost of all gates when every input channel is active."""
        return sum(u.in_channels * u.out_channels for u in self.units)
