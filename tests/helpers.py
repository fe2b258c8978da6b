"""Helpers shared by several test files (import them as ``from helpers import ...``)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn

from ftwt_cli.gating import GatedModel

__all__ = ["no_natural_zeros", "MacsMeter", "StopAfter", "tree", "one_line_error"]


def no_natural_zeros(model: nn.Module) -> nn.Module:
    """Swap ReLU/ReLU6 for LeakyReLU (f(0)=0 too) and give every norm a non-zero random scale (timm zero-inits
    some), so that every all-zero channel the hooks see is a structural one."""
    g = torch.Generator().manual_seed(0)
    for name, m in list(model.named_modules()):
        for cname, c in list(m.named_children()):
            if isinstance(c, (nn.ReLU, nn.ReLU6)):
                setattr(m, cname, nn.LeakyReLU(0.1))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    return model


class MacsMeter:
    """Independent count: forward hooks that see the tensors each conv/linear really reads and writes."""

    def __init__(self, g: GatedModel):
        self.g, self.macs, self.handles = g, None, []
        mods = dict(g.backbone.named_modules())
        ends = {u.end: u.name for u in g.units if u.kind != "glu"}
        self.out_active = {}
        for op in g.plan.ops:
            self.handles.append(mods[op.name].register_forward_hook(self._op_hook(op)))
        for end, conv in ends.items():   # registered after the mask hook: sees the masked output
            self.handles.append(mods[end].register_forward_hook(self._end_hook(conv)))
        for u in g.units:                # a gated MLP: the features of the product fc2 reads (after the mask)
            if u.kind == "glu":
                self.handles.append(mods[u.reader].register_forward_pre_hook(self._reader_hook(u.name)))
            if u.kind == "stream":       # a residual block's gate reads the block's input
                self.handles.append(mods[u.name].register_forward_pre_hook(self._block_hook(u.name)))

    def _end_hook(self, conv):
        def hook(m, args, out):
            self.out_active[conv] = _active(out, isinstance(m, nn.Linear))
        return hook

    def _reader_hook(self, unit):
        def hook(m, args):
            self.out_active[unit] = _active(args[0], True)
        return hook

    def _block_hook(self, unit):
        def hook(m, args):
            self.block_in[unit] = _active(args[0], False)
        return hook

    def _op_hook(self, op):
        def hook(m, args, out):
            self.pending.append((op, _active(args[0], op.kind == "linear"), out))
        return hook

    def run(self, x):
        self.pending, self.out_active, self.block_in = [], {}, {}
        with torch.no_grad():
            self.g(x)
        B = x.shape[0]
        total = torch.zeros(B, dtype=torch.float64)
        gated = {u.name: u for u in self.g.units}
        # the rows a gated MLP's fc1 computes: the hidden units fc2 reads, in each half of a chunked fc1 and in the
        # gate projection of a SwiGLU
        # ... and the convs feeding a residual-stream unit's masked sum: the filters the block's output keeps
        computes = {**{n: n for n in gated}, **{u.partner: u.name for u in self.g.units if u.partner},
                    **{n: u.name for u in self.g.units for n in u.computes}}
        for op, a_in, out in self.pending:
            a_out = torch.ones(B, op.out_channels, dtype=torch.bool)
            if op.name in computes and self.g.mode != "open":
                a_out = self.out_active.get(computes[op.name], a_out)
                if a_out.shape[1] * 2 == op.out_channels:
                    a_out = torch.cat([a_out, a_out], 1)
            pos = out.numel() // (B * op.out_channels)      # H·W, or tokens (Swin folds windows into dim 0)
            cin, cout = op.in_channels // op.groups, op.out_channels // op.groups
            for b in range(B):
                for grp in range(op.groups):
                    i = int(a_in[b, grp * cin:(grp + 1) * cin].sum())
                    o = int(a_out[b, grp * cout:(grp + 1) * cout].sum())
                    total[b] += i * o * op.kernel_area * pos
                if op.name in gated and not gated[op.name].follows and self.g.mode != "open":
                    # the gate: GAP → Linear(C_in → one logit per unit, or per group of units)
                    total[b] += int(a_in[b].sum()) * self.g.gates[op.name.replace(".", "__")].fc.out_features
        if self.g.mode != "open":
            for name, a_in in self.block_in.items():
                total += a_in.sum(1).double() * self.g.gates[name.replace(".", "__")].fc.out_features
        # attention's matrix products (dense, no weights to hook): the model's own per-size figure
        return total + self.g.attention_macs(tuple(x.shape[1:]))


def _active(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(B, C) bool: channels (features) that are non-zero somewhere in the sample."""
    if t.dim() == 2:
        return t.ne(0)
    return t.flatten(1, -2).ne(0).any(1) if channels_last else t.flatten(2).ne(0).any(2)


class StopAfter:
    """A training progress that interrupts the run (as Ctrl-C would) once epoch ``n`` is committed."""

    def __init__(self, n: int) -> None:
        self.n = n

    def start(self, *a) -> None: ...

    def step(self, *a) -> None: ...

    def validating(self) -> None: ...

    def note(self, text) -> None: ...

    def end(self, stats) -> None:
        if stats.epoch >= self.n:
            raise KeyboardInterrupt


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(res, expect):
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], res.stderr
    assert "Traceback" not in res.output
