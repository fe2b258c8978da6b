"""Every gated layer's per-sample vectors of one forward, side by side in one flat tensor.

Training touches all gated layers' (B, C_l) logits, ground-truth scores, targets and masks at once: the BCE and its
gradient, the ranking, the progress metrics. Kept per layer, each of those starts with a concatenation (four to
seven per step, ~0.4 ms at batch 128 on a CPU, measured); written by the hooks straight into one buffer per kind,
they need none.

Layout: layer blocks of (B, C_l), each contiguous, layers grouped by width C (in forward order within a group),
so that a group's blocks form one contiguous (n·B, C) matrix whose rows the ground-truth rule ranks at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch

__all__ = ["Layout", "FlatBuffers", "SideBySide"]


@dataclass(frozen=True)
class Layout:
    names: Tuple[str, ...]                       # layers in layout order
    widths: Tuple[int, ...]                      # C_l, same order
    offsets: Tuple[int, ...]                     # per-sample offset of each layer's block: Σ widths before it
    groups: Tuple[Tuple[int, int, int], ...]     # (first layer index, layers, width): consecutive layers of one width

    @classmethod
    def of(cls, names: Sequence[str], widths: Sequence[int]) -> "Layout":
        order: Dict[int, List[int]] = {}
        for i, c in enumerate(widths):
            order.setdefault(c, []).append(i)
        idx = [i for ids in order.values() for i in ids]
        ws = tuple(widths[i] for i in idx)
        offs = tuple(sum(ws[:j]) for j in range(len(ws)))
        groups, j = [], 0
        for c, ids in order.items():
            groups.append((j, len(ids), c))
            j += len(ids)
        return cls(tuple(names[i] for i in idx), ws, offs, tuple(groups))

    @property
    def total(self) -> int:
        return sum(self.widths)

    def block(self, flat: torch.Tensor, i: int, batch: int) -> torch.Tensor:
        """Layer i's (B, C_i) view of a flat buffer."""
        o = batch * self.offsets[i]
        return flat[o:o + batch * self.widths[i]].view(batch, self.widths[i])

    def group(self, flat: torch.Tensor, g: int, batch: int) -> torch.Tensor:
        """Group g's (n·B, C) view: every (layer, sample) row of that width."""
        first, n, c = self.groups[g]
        o = batch * self.offsets[first]
        return flat[o:o + n * batch * c].view(n * batch, c)

    def sample_counts(self, flags: torch.Tensor, batch: int) -> torch.Tensor:
        """(L, B) float64: the set entries of each layer's row for each sample, in a flat bool buffer (exact; one
        int32 sum per width: a bool or float64 sum per layer costs several times more on a CPU, measured)."""
        u = flags.view(torch.uint8)
        return torch.cat([self.group(u, g, batch).view(n, batch, c).sum(2, dtype=torch.int32)
                          for g, (_, n, c) in enumerate(self.groups)]).double()


@dataclass
class FlatBuffers:
    """One forward's flat buffers, allocated on first write (with that tensor's dtype and device). ``slot`` hands a
    hook its layer's block, once; a layer that runs twice, or a batch or dtype that does not match, marks that kind
    incomplete, and readers then fall back to concatenating the per-layer tensors."""
    layout: Layout
    batch: int
    index: Dict[str, int]
    bufs: Dict[str, torch.Tensor] = field(default_factory=dict)
    seen: Dict[str, Set[int]] = field(default_factory=dict)
    broken: Set[str] = field(default_factory=set)
    counts: Dict[str, torch.Tensor] = field(default_factory=dict)     # kind -> its (L, B) sample_counts, once

    @classmethod
    def new(cls, layout: Layout, batch: int) -> "FlatBuffers":
        return cls(layout, batch, {n: i for i, n in enumerate(layout.names)})

    def slot(self, kind: str, name: str, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
        i, dtype = self.index.get(name), dtype or like.dtype
        seen = self.seen.setdefault(kind, set())
        if kind in self.broken or i is None or i in seen or like.shape[0] != self.batch:
            self.broken.add(kind)
            return None
        buf = self.bufs.get(kind)
        if buf is None:
            buf = self.bufs[kind] = torch.empty(self.batch * self.layout.total, dtype=dtype, device=like.device)
        elif buf.dtype != dtype or buf.device != like.device:
            self.broken.add(kind)
            return None
        seen.add(i)
        return self.layout.block(buf, i, self.batch)

    def put(self, kind: str, flat: torch.Tensor) -> None:
        """A whole flat buffer made at once (the targets, ranked after the forward)."""
        self.bufs[kind], self.seen[kind] = flat, set(range(len(self.layout.names)))
        self.counts.pop(kind, None)

    def complete(self, kind: str) -> Optional[torch.Tensor]:
        """The flat buffer of ``kind`` if every layer wrote its block exactly once, else None."""
        if kind in self.broken or not self.layout.names or len(self.seen.get(kind, ())) != len(self.layout.names):
            return None
        return self.bufs[kind]

    def sample_counts(self, kind: str) -> Optional[torch.Tensor]:
        """``Layout.sample_counts`` of the complete bool buffer of ``kind`` (else None), counted once: the MACs
        count and the progress metrics both need the masks' counts."""
        if kind not in self.counts:
            whole = self.complete(kind)
            if whole is None:
                return None
            self.counts[kind] = self.layout.sample_counts(whole, self.batch)
        return self.counts[kind]


@dataclass(frozen=True)
class SideBySide:
    """The layers with ground truth and their flat logits, targets and (when predicted) masks: (B·Σ C_l,) each, in
    ``layout`` order (the model's, or the same order restricted to the layers that ran)."""
    layout: Layout
    batch: int
    logits: Optional[torch.Tensor]      # None where the gates did not run
    targets: torch.Tensor
    masks: Optional[torch.Tensor]       # None unless predicted
    flat: Optional[FlatBuffers] = None  # the hooks' buffers, where the tensors above are theirs

    @property
    def names(self) -> Tuple[str, ...]:
        return self.layout.names

    @property
    def widths(self) -> Tuple[int, ...]:
        return self.layout.widths

    def blocks(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """The per-layer (B, C_l) views of a flat tensor in this layout."""
        return [self.layout.block(flat, i, self.batch) for i in range(len(self.layout.names))]

    def batch_sums(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """Per layer, the (C_l,) sum over the batch of its block: one reduction per width."""
        b, lay = self.batch, self.layout
        return [t for g, (_, n, c) in enumerate(lay.groups) for t in lay.group(flat, g, b).view(n, b, c).sum(1).unbind(0)]

    def layer_counts(self, flags: torch.Tensor) -> torch.Tensor:
        """(L,) float64: how many entries of each layer's block are set, in a flat bool tensor (exact); a hooks'
        buffer is counted only once."""
        fl = self.flat
        if fl is not None and fl.layout == self.layout:
            for kind, buf in fl.bufs.items():
                if buf is flags and (n := fl.sample_counts(kind)) is not None:
                    return n.sum(1)
        return self.layout.sample_counts(flags, self.batch).sum(1)
