"""GatedModel: a backbone with one decision gate per gated unit, driven by forward hooks.

The backbone is left structurally untouched (its state-dict keys stay the source checkpoint's, under
``backbone.``); hooks do the work:
* a forward pre-hook on each gated conv runs its gate on the conv's input (GAP → Linear(C_in → C_out));
* a forward hook on the unit's end module (the norm after the conv, or the conv itself) computes the mask — from
  the gate (``predict``), from the ground-truth rule on this very output (``oracle``), or none (``open``) — and
  multiplies it in, so the activation that follows (f(0) = 0) sees exact zeros; a gated (GLU) MLP's mask goes on
  its fc2's input instead, by a forward pre-hook, so fc2 reads exact zeros whatever the activation;
* a forward hook on every conv/linear records its output positions for the MACs count.

Per forward the model records each unit's gate logits, ground-truth scores (when asked) and masks; nothing else.
What a training loop wants is said explicitly: ``with model.collecting(decoupled=True): model(x)`` also scores
channels for the ground truth (ranked after the forward, on first use of ``last_targets``), and
``with model.forcing(masks):`` replays fixed masks. ``collecting(straight_through=True)`` makes the masks
differentiable (task-aware gates): forward the hard 0/1 mask, backward through sigmoid(logit), so the task loss and
a MACs budget term (``differentiable_macs``) reach the gates.

Hooks are bound to module *names*: a forward first checks that each hooked path still holds the module it hooked,
and re-installs the hooks where one was swapped (e.g. ``nn.SyncBatchNorm.convert_sync_batchnorm``). They are
removed only through their handles; ``copy.deepcopy(model)`` yields an independent copy with hooks of its own.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..arch.attention import attention_macs
from ..arch.plan import Plan, Unit
from ..arch.trace import trace_plan
from ..errors import FtwtError
from ..settings import GATE_MODES
from .gate import Gate, check_group_size, gate_key
from .macs import MacsBreakdown, count_macs
from .targets import GT_RULES, check_r, ground_truth, ground_truth_many

__all__ = ["GatedModel", "ForwardStats", "GATE_MODES", "model_macs", "straight_through"]

# Activations that are monotone (non-decreasing): max |f(y)| over a map sits where y is largest or smallest.
_MONOTONE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.ELU, nn.Tanh, nn.Identity)
# Units whose tensors hold channels at dim 1: a conv's output, a residual block's output (a stream unit).
_CHANNELS_FIRST = ("conv", "stream")
# Functional activations the tracer names (an MLP's F.gelu between fc1 and fc2).
_FUNCTIONAL = {"gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}


@dataclass(frozen=True)
class ForwardStats:
    """What the last forward did, per sample."""
    macs: torch.Tensor                  # (B,) float64 MACs, gates included
    gate_macs: torch.Tensor             # (B,) float64
    dense_macs: float                   # MACs of the source model at this input size
    masks: Dict[str, torch.Tensor]      # gated layer -> (B, C_out) bool (empty when gates are open)
    per_layer: Dict[str, torch.Tensor] = field(default_factory=dict)   # conv/linear -> (B,) MACs
    positions: Dict[str, int] = field(default_factory=dict)            # conv/linear -> output positions (H·W, tokens)


@dataclass
class _Record:
    """One forward's records."""
    rule: Tuple[float, str]                                          # (r, gt) the forward ran with
    logits: Dict[str, torch.Tensor] = field(default_factory=dict)
    masks: Dict[str, torch.Tensor] = field(default_factory=dict)
    scores: Dict[str, torch.Tensor] = field(default_factory=dict)    # ranked into targets on first use
    soft: Dict[str, torch.Tensor] = field(default_factory=dict)      # straight-through masks (float, with grad)
    targets: Dict[str, torch.Tensor] = field(default_factory=dict)
    positions: Dict[str, int] = field(default_factory=dict)
    batch: int = 1                                                   # samples in the forward's input


@dataclass
class _Control:
    """What the forwards inside ``collecting`` / ``forcing`` do beyond the gate mode."""
    collect: bool = False
    decoupled: bool = True
    forced: Optional[Mapping[str, torch.Tensor]] = None
    straight_through: bool = False


def straight_through(logits: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """The hard mask in the forward, sigmoid(logit)'s gradient in the backward (the straight-through estimator
    with a sigmoid, Bengio et al. 2013; DGNet's gates): ``hard + (p − p.detach())`` is exactly ``hard`` in value
    (x − x = 0 in floating point), so MACs and activations are those of the hard mask, bit for bit."""
    p = logits.float().sigmoid()
    return hard.to(p.dtype) + (p - p.detach())


def _inert(*args) -> None:
    return None


class _Hook:
    """Base of the model's hooks. A deep copy of a hooked submodule on its own (not through the GatedModel, which
    hooks its copy itself) gets an inert hook instead of a second GatedModel."""

    def __deepcopy__(self, memo):
        return _inert


class _GateHook(_Hook):
    def __init__(self, owner: "GatedModel", unit: Unit) -> None:
        self.owner, self.name, self.key = owner, unit.name, gate_key(unit.name)

    def __call__(self, module: nn.Module, args) -> None:
        g = self.owner
        if g.mode == "predict":
            x = args[0]
            g._rec.logits[self.name] = g.gates[self.key](x.detach() if g._ctl.decoupled else x)


class _MaskHook(_Hook):
    def __init__(self, owner: "GatedModel", unit: Unit) -> None:
        self.owner, self.unit = owner, unit

    def _scores(self, out: torch.Tensor) -> torch.Tensor:
        """(B, C) float32 spatial (or over tokens) max of |activation(unit output)|: what the ground truth ranks
        channels (hidden units) by.

        A maximum is exact in any dtype, so the spatial max and min are taken on the output as it is (bf16 under
        autocast: no float32 copy of the whole map) and only the (B, C) results are made float32. For a monotone
        activation f the maximum of |f(y)| over a map is reached where y is largest or smallest, so f on the spatial
        max and min gives it exactly, without another pass over the full tensor; for ReLU the max alone suffices.
        Other activations (SiLU, GELU, ...) run on a float32 copy of the whole output."""
        y = out.detach()
        act, dims = self.unit.act, self.dims(y)
        if act is None:                              # max |y| = max(max y, −min y), without an |y| copy
            return torch.maximum(y.amax(dim=dims), y.amin(dim=dims).neg()).float()
        if act == "relu":
            return y.amax(dim=dims).float().relu()
        if act in _FUNCTIONAL:
            return _FUNCTIONAL[act](y.float()).abs().amax(dim=dims)
        module = self.owner.backbone.get_submodule(act)
        if isinstance(module, nn.ReLU):
            return y.amax(dim=dims).float().relu()
        if isinstance(module, _MONOTONE):
            return torch.maximum(module(y.amax(dim=dims).float()).abs(), module(y.amin(dim=dims).float()).abs())
        return module(y.to(torch.float32, copy=True)).abs().amax(dim=dims)   # a copy: the activation may be in-place

    def dims(self, y: torch.Tensor) -> Tuple[int, ...]:
        """The dims a unit's mask is shared over: H, W of a conv; the tokens of an MLP (channels last)."""
        return (2, 3) if self.unit.kind in _CHANNELS_FIRST else tuple(range(1, y.dim() - 1))

    def expand(self, mask: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, C) mask → broadcastable to the unit's output y."""
        if self.unit.kind in _CHANNELS_FIRST:
            return mask[:, :, None, None]
        return mask.view(mask.shape[0], *([1] * (y.dim() - 2)), mask.shape[1])

    def __call__(self, module: nn.Module, args, out: torch.Tensor):
        return self.apply(out, inplace=out.data_ptr() != args[0].data_ptr())

    def apply(self, out: torch.Tensor, inplace: bool) -> Optional[torch.Tensor]:
        """Mask ``out`` (the unit's hidden units, channels or features); None leaves it as it is."""
        g, name, rec = self.owner, self.unit.name, self.owner._rec
        soft = None                              # the straight-through mask, when the masks are differentiable
        if self.unit.follows:                    # the mask of the unit it follows, whatever decided that one
            if g.mode == "open":                 # (no gate, so no ground truth to learn from either)
                return None
            mask, soft = rec.masks[self.unit.follows], rec.soft.get(self.unit.follows)
        elif g.mode == "oracle":                 # the mask is this layer's ground truth: rank now
            with torch.no_grad():
                gate = g.gates[gate_key(name)]
                mask = rec.targets[name] = gate.channels(ground_truth(gate.group_scores(self._scores(out)), g.r, g.gt))
        else:
            if g._ctl.collect:                   # only the loss needs it: ranked after the forward
                with torch.no_grad():
                    rec.scores[name] = self._scores(out)
            if g.mode == "open":
                return None
            forced = g._ctl.forced
            if forced is not None:
                mask = forced[name]
            else:
                logits = rec.logits[name]
                mask = logits.detach() > 0
                if g._ctl.straight_through:
                    soft = straight_through(logits, mask)
        rec.masks[name] = mask
        if soft is not None:
            rec.soft[name] = soft
            return out * self.expand(soft.to(out.dtype), out)
        m = self.expand(mask.to(out.dtype), out)
        if not out.requires_grad and inplace:
            return out.mul_(m)      # nothing differentiates through it and it is not the module's input: no copy
        return out * m


class _ReaderMaskHook(_MaskHook):
    """A gated MLP's mask, on the input of its fc2 (the product act(g) · x): a forward pre-hook."""

    def __call__(self, module: nn.Module, args):
        out = self.apply(args[0], inplace=False)      # the product may be saved for another op's backward
        return None if out is None else (out, *args[1:])


class _PositionHook(_Hook):
    def __init__(self, owner: "GatedModel", name: str, kind: str, out_features: int) -> None:
        self.owner, self.name, self.kind, self.out_features = owner, name, kind, out_features

    def __call__(self, module: nn.Module, args, out: torch.Tensor) -> None:
        # output positions per sample: H_out·W_out of a conv, tokens of a linear (1 for a (B, F) input). Counted from
        # the whole output, as a layer may run on windows folded into the batch dim (Swin: (B·windows, 49, C)).
        n = out.numel() // (self.out_features * self.owner._rec.batch)
        pos = self.owner._rec.positions
        pos[self.name] = pos.get(self.name, 0) + int(n)


class GatedModel(nn.Module):
    """A backbone with decision gates. ``set_gates`` picks how masks are made; ``last_stats`` reports."""

    def __init__(self, backbone: nn.Module, plan: Plan, gated: Optional[Sequence[str]] = None, *,
                 group_size: int = 1, fixed_open: Optional[Mapping[str, int]] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.plan = plan
        names = [u.name for u in plan.units] if gated is None else list(gated)
        by_name = {u.name: u for u in plan.units}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise FtwtError(f"not gateable: {', '.join(unknown[:3])}", "choose layers from the attach table")
        self.units: List[Unit] = [by_name[n] for n in names]
        lost = [u.name for u in self.units if u.follows and u.follows not in names]
        if lost:
            raise FtwtError(f"{lost[0]} follows {by_name[lost[0]].follows}, which is not gated",
                            "gate the unit it follows too, or attach without --depthwise-follow")
        # a follower has no gate: it takes the mask of the unit it follows
        self.group_size = check_group_size(group_size)
        fixed = dict(fixed_open or {})      # unit → channels without a gate (a hybrid model's always-open channels)
        self.gates = nn.ModuleDict({gate_key(u.name): Gate(u.in_channels, u.out_channels, u.kind not in _CHANNELS_FIRST, group_size,
                                                           fixed.get(u.name, 0))
                                    for u in self.units if not u.follows})
        self.mode, self.r, self.gt = "open", 0.95, "mass"
        self.meta = None               # io.meta.RunMeta once loaded from a run or an export
        self._ctl = _Control()
        self._rec = _Record((self.r, self.gt))
        self._last: Optional[tuple] = None          # (record, batch, input size, gates ran) of the last forward
        self._last_stats: Optional[ForwardStats] = None
        self._dense_cache: Dict[tuple, float] = {}
        self._attention_cache: Dict[tuple, float] = {}
        self._hooked: Dict[str, nn.Module] = {}
        self._handles: list = []
        self._install_hooks()

    # ------------------------------------------------------------------ hooks
    def _install_hooks(self) -> None:
        self._remove_hooks()
        get = self.backbone.get_submodule
        for u in self.units:
            if not u.follows:
                self._hook(u.name, get(u.name).register_forward_pre_hook(_GateHook(self, u)))
            if u.kind == "glu":
                self._hook(u.end, get(u.end).register_forward_pre_hook(_ReaderMaskHook(self, u)))
            else:
                self._hook(u.end, get(u.end).register_forward_hook(_MaskHook(self, u)))
        for op in self.plan.ops:
            self._hook(op.name, get(op.name).register_forward_hook(_PositionHook(self, op.name, op.kind, op.out_channels)))

    def _hook(self, name: str, handle) -> None:
        self._hooked[name] = self.backbone.get_submodule(name)
        self._handles.append(handle)

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._hooked = [], {}

    def _hooks_current(self) -> bool:
        get = self.backbone.get_submodule
        return all(get(n) is m for n, m in self._hooked.items())

    def __deepcopy__(self, memo):
        # copy the model without its hooks (handles cannot be copied), then hook the copy's own modules
        self._remove_hooks()
        try:
            new = self.__class__.__new__(self.__class__)
            memo[id(self)] = new
            for k, v in self.__dict__.items():
                new.__dict__[k] = copy.deepcopy(v, memo)
        finally:
            self._install_hooks()
        new._install_hooks()
        return new

    def plain_backbone(self) -> nn.Module:
        """A deep copy of the backbone without this model's hooks (anyone else's hooks travel with it), in eval mode."""
        self._remove_hooks()
        try:
            return copy.deepcopy(self.backbone).eval()
        finally:
            self._install_hooks()

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

    @contextmanager
    def collecting(self, *, decoupled: bool = True, straight_through: bool = False) -> Iterator["GatedModel"]:
        """Forwards inside also score every unit's channels for the ground truth (``last_targets``).
        ``decoupled``: the gates read a detached input, so a loss on their logits never reaches the backbone.
        ``straight_through`` (task-aware gates): predicted masks carry sigmoid(logit)'s gradient, so the task loss
        reaches the gates, and ``differentiable_macs`` gives the forward's MACs with that gradient."""
        saved = self._ctl
        self._ctl = _Control(True, decoupled, saved.forced, straight_through)
        try:
            yield self
        finally:
            self._ctl = saved

    @contextmanager
    def forcing(self, masks: Mapping[str, torch.Tensor]) -> Iterator["GatedModel"]:
        """Forwards inside (in ``predict`` mode) apply these (B, C_out) bool masks; the gates still run."""
        saved = self._ctl
        self._ctl = _Control(saved.collect, saved.decoupled, masks, saved.straight_through)
        try:
            yield self
        finally:
            self._ctl = saved

    @property
    def gated_names(self) -> List[str]:
        return [u.name for u in self.units]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor):
        if not self._hooks_current():
            self._install_hooks()
        self._rec = _Record((self.r, self.gt), batch=x.shape[0])
        out = self.backbone(x)
        # MACs are counted when someone asks (last_stats), not on every forward: inference pays nothing for them.
        self._last, self._last_stats = (self._rec, x.shape[0], tuple(x.shape[1:]), self.mode != "open"), None
        return out

    @property
    def last_stats(self) -> Optional[ForwardStats]:
        """Per-sample MACs and masks of the last forward (computed on first access)."""
        if self._last_stats is None and self._last is not None:
            self._last_stats = self._stats(*self._last)
        return self._last_stats

    @property
    def last_logits(self) -> Dict[str, torch.Tensor]:
        """Gate logits of the last forward (``predict`` mode), by unit name."""
        return self._rec.logits

    @property
    def last_masks(self) -> Dict[str, torch.Tensor]:
        """(B, C_out) bool masks applied in the last forward, by unit name."""
        return self._rec.masks

    @property
    def last_scores(self) -> Dict[str, torch.Tensor]:
        """Per-channel (B, C) scores of the last forward inside ``collecting``, not yet ranked (``last_targets`` ranks
        them, per group for grouped gates, and consumes them)."""
        return dict(self._rec.scores)

    @property
    def last_targets(self) -> Dict[str, torch.Tensor]:
        """Ground-truth masks of the last forward (inside ``collecting``, or in ``oracle`` mode).

        The hooks keep only each unit's (B, C) scores and the ranking runs here, after the forward, so its dozen
        small operations per layer do not run between convolutions."""
        rec = self._rec
        if rec.scores:
            r, gt = rec.rule
            # grouped gates: the rule ranks groups by their summed scores, and each channel takes its group's target
            gates = {n: self.gates[gate_key(n)] for n in rec.scores}
            ranked = ground_truth_many({n: gates[n].group_scores(s) for n, s in rec.scores.items()}, r, gt)
            rec.targets.update({n: gates[n].channels(t) for n, t in ranked.items()})
            rec.scores = {}
        return rec.targets

    def _stats(self, rec: _Record, batch: int, size: tuple, gates_run: bool) -> ForwardStats:
        masks = {k: v.detach() for k, v in rec.masks.items()}
        dev = next(self.backbone.parameters()).device
        attn = self.attention_macs(size)
        b = count_macs(self.plan.ops, self.units, masks, rec.positions, batch, gates_run=gates_run, device=dev,
                       attention=attn, gate_outputs=self.gate_outputs)
        if size not in self._dense_cache:
            self._dense_cache[size] = float(count_macs(self.plan.ops, self.units, {}, rec.positions, 1, gates_run=False,
                                                       attention=attn).total[0])
        return ForwardStats(b.total, b.gates, self._dense_cache[size], masks, b.per_op, dict(rec.positions))

    def differentiable_macs(self) -> torch.Tensor:
        """(B,) float64 MACs of the last forward (gates included), differentiable in the gates' logits: the exact count
        of its hard masks in value, with the straight-through masks' gradient (a forward inside
        ``collecting(straight_through=True)`` in ``predict`` mode)."""
        rec = self._rec
        if not rec.soft:
            raise ValueError("differentiable_macs needs a forward in predict mode inside collecting(straight_through=True)")
        dev = next(iter(rec.soft.values())).device
        return count_macs(self.plan.ops, self.units, rec.soft, rec.positions, rec.batch, gates_run=True, device=dev,
                          attention=self.attention_macs(self._last[2]), gate_outputs=self.gate_outputs).total

    def closed_macs(self, input_size: Optional[tuple] = None) -> float:
        """Per-sample MACs with every gated channel closed (channels without a gate stay open), gates included: the
        least a budget can ask of this model at ``input_size`` (default: the plan's)."""
        size = tuple(input_size or self.plan.input_size)
        self.dense_macs(size)                      # one forward for the output positions at this size
        dev = next(self.backbone.parameters()).device
        masks: Dict[str, torch.Tensor] = {}
        for u in self.units:
            if not u.follows:
                gate = self.gates[gate_key(u.name)]
                masks[u.name] = gate.channels(torch.zeros(1, gate.groups, dtype=torch.bool, device=dev))
        masks.update({u.name: masks[u.follows] for u in self.units if u.follows})
        return float(count_macs(self.plan.ops, self.units, masks, self._rec.positions, 1, gates_run=True, device=dev,
                                attention=self.attention_macs(size), gate_outputs=self.gate_outputs).total[0])

    def dense_macs(self, input_size: Optional[tuple] = None) -> MacsBreakdown:
        """MACs of the source model (gates open, no gate cost) at ``input_size`` (default: the plan's)."""
        size = tuple(input_size or self.plan.input_size)
        mode, was = self.mode, self.training
        self.mode = "open"
        try:
            with torch.no_grad():
                p = next(self.backbone.parameters())
                self.eval()
                self(torch.zeros(1, *size, dtype=p.dtype, device=p.device))
        finally:
            self.mode = mode
            self.train(was)
        return count_macs(self.plan.ops, self.units, {}, self._rec.positions, 1, gates_run=False,
                          attention=self.attention_macs(size))

    def attention_macs(self, input_size: Sequence[int]) -> float:
        """Per-sample MACs of attention's matrix products at ``input_size``: the plan's figure at its own size, else
        measured once per size on the plain backbone (a model without attention at the plan's size has none)."""
        size = tuple(input_size)
        if size == tuple(self.plan.input_size):
            return self.plan.attention_macs
        if not self.plan.attention_macs:
            return 0.0
        if size not in self._attention_cache:
            self._remove_hooks()
            try:
                self._attention_cache[size] = attention_macs(self.backbone, size)
            finally:
                self._install_hooks()
        return self._attention_cache[size]

    @property
    def fixed_open(self) -> Dict[str, int]:
        """Units with channels that have no gate (always open): unit → how many."""
        fixed = {u.name: self.gates[gate_key(u.name)].fixed_open for u in self.units if not u.follows}
        return {n: k for n, k in fixed.items() if k}

    @property
    def gate_outputs(self) -> Dict[str, int]:
        """Logits each unit's gate computes (its channels, or its groups of channels); followers have none."""
        return {u.name: self.gates[gate_key(u.name)].groups for u in self.units if not u.follows}

    def gate_macs_dense(self) -> int:
        """Cost of all gates when every input channel is active."""
        outs = self.gate_outputs
        return sum(u.in_channels * outs[u.name] for u in self.units if not u.follows)


def model_macs(module: nn.Module, input_size: Sequence[int]) -> float:
    """MACs of a plain model at ``input_size`` (C, H, W) in ftwt's count (conv and linear layers, per sample)."""
    was = module.training
    g = GatedModel(module, trace_plan(module, tuple(input_size)), gated=[]).train(was)
    try:
        return float(g.dense_macs(tuple(input_size)).total[0])
    finally:
        g._remove_hooks()
        module.train(was)
