"""A pruning plan: the channels a statically pruned model kept, per layer, as indices into the source model.

Torch-Pruning's pickled modules only load with ``weights_only=False``; a plan is plain JSON instead. Applying it to a
fresh copy of the source architecture (Torch-Pruning's own per-layer pruning functions, with the complement of the
kept indices) gives a module of the pruned shapes, into which the pruned model's plain state dict loads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping

import torch.nn as nn

from ..errors import FtwtError
from ..formats.rundir import atomic_write_text

__all__ = ["PruningPlan", "apply_plan", "PLAN_FORMAT_VERSION"]

PLAN_FORMAT_VERSION = 1


@dataclass
class PruningPlan:
    """``layers[name]``: the kept indices of the module's output channels (``"out"``) and/or input channels
    (``"in"``), in the order Torch-Pruning pruned them; ``sizes[name]``: those dimensions' sizes in the source model.
    Modules not listed are untouched."""
    importance: str
    layers: Dict[str, Dict[str, List[int]]] = field(default_factory=dict)
    sizes: Dict[str, Dict[str, int]] = field(default_factory=dict)
    format_version: int = PLAN_FORMAT_VERSION

    def to_dict(self) -> dict:
        return {"importance": self.importance, "layers": self.layers, "sizes": self.sizes,
                "format_version": self.format_version}

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "the pruning plan") -> "PruningPlan":
        if not isinstance(d, Mapping) or set(d) - {"importance", "layers", "sizes", "format_version"} or "layers" not in d:
            raise FtwtError(f"{where} is not a pruning plan", "pass the plan written with the pruned model")
        if int(d.get("format_version", 1)) > PLAN_FORMAT_VERSION:
            raise FtwtError(f"{where} has format version {d.get('format_version')}; this ftwt reads up to {PLAN_FORMAT_VERSION}",
                            "upgrade ftwt")
        try:
            return cls(str(d.get("importance", "")),
                       {str(k): {kind: [int(i) for i in kept] for kind, kept in v.items()} for k, v in d["layers"].items()},
                       {str(k): {kind: int(n) for kind, n in v.items()} for k, v in d.get("sizes", {}).items()})
        except (AttributeError, TypeError, ValueError):
            raise FtwtError(f"{where} is damaged", "pass the plan written with the pruned model") from None

    def save(self, path: Path | str) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path | str) -> "PruningPlan":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()), str(path))
        except (OSError, ValueError) as e:
            raise FtwtError(f"cannot read the pruning plan {path} ({e})", "pass the plan written with the pruned model") from None


def _pruner(module: nn.Module):
    import torch_pruning as tp  # deferred: only static twins need Torch-Pruning
    p = tp.pruner.function.PrunerBox.get(tp.ops.module2type(module))
    if p is None:
        raise FtwtError(f"the pruning plan names a {type(module).__name__}, which Torch-Pruning cannot prune",
                        "re-create the static model with this ftwt and Torch-Pruning")
    return p


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Prune ``model`` (a fresh instance of the plan's source architecture) in place to the plan's shapes."""
    modules = dict(model.named_modules())
    for name, dims in plan.layers.items():
        m = modules.get(name)
        if m is None:
            raise FtwtError(f"the pruning plan names layer '{name}', which the model does not have",
                            "apply the plan to the architecture it was made for")
        p = _pruner(m)
        for kind, kept_list in dims.items():          # in the order they were pruned
            kept = set(kept_list)
            removed = [i for i in range(plan.sizes[name][kind]) if i not in kept]
            if removed:
                (p.prune_out_channels if kind == "out" else p.prune_in_channels)(m, removed)
    return model
