"""The tracer's result, as a run stores it: gateable ``Unit``s, the conv/linear ``MacOp``s MACs are counted for, and
the sparsity expressions saying which input channels of each are structurally zero (their width, their
simplification)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

__all__ = ["Unit", "MacOp", "Plan", "Expr", "expr_width", "simplify"]

# An expression is a JSON-friendly nested list: ["dense", width] | ["unit", name, width] | ["cat", [e, ...]]
# | ["slice", e, start, stop] | ["any", [e, ...]] (active where any term is) | ["all", [e, ...]]
# | ["repeat", e, n] (flatten: each channel becomes n features).
Expr = list


@dataclass(frozen=True)
class Unit:
    """A gateable unit: ``name`` is the conv's (or fc1's, or a residual block's) path, ``end`` the module whose output
    is masked."""
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
    # a depthwise conv that reads exactly another unit's output: no gate of its own, that unit's mask on its output
    # (attach --depthwise-follow), so its masked channels are zero, not BN(0) → act(β), for the conv after it
    follows: Optional[str] = None
    # a residual-stream unit (kind "stream", attach --residual-stream): ``name`` and ``end`` are the block, whose
    # output after the add (and its activation) is masked and whose input the gate reads; ``computes`` are the convs
    # whose output reaches only that masked sum (the branch's last conv, a shortcut conv), so they compute only the
    # kept filters
    computes: Tuple[str, ...] = ()
    computes_ends: Tuple[str, ...] = ()    # per conv of ``computes``: its norm (folded into it), or the conv itself


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
        units = [{k: v for k, v in asdict(u).items()
                  if not (u.kind == "conv" and k in ("kind", "reader", "partner")) and not (k == "follows" and v is None)
                  and not (k in ("computes", "computes_ends") and not v)}
                 for u in self.units]
        d = {"units": units, "ops": [asdict(o) for o in self.ops], "rejected": self.rejected,
             "input_size": list(self.input_size)}
        if self.attention_macs:
            d["attention_macs"] = self.attention_macs
        return d

    @property
    def has_new_features(self) -> bool:
        """MLP units, residual-stream units, attention products or depthwise followers: what run format version 1
        cannot hold."""
        return bool(self.attention_macs) or any(u.kind != "conv" or u.follows for u in self.units)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        units = [Unit(**{**u, "kernel": tuple(u["kernel"]), "computes": tuple(u.get("computes", ())),
                              "computes_ends": tuple(u.get("computes_ends", ()))}) for u in d["units"]]
        return cls(units, [MacOp(**o) for o in d["ops"]], dict(d.get("rejected", {})), tuple(d["input_size"]),
                   float(d.get("attention_macs", 0.0)))


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


def simplify(e: Expr) -> Expr:
    """The same expression, with terms that say nothing removed (a dense term in an "any", …)."""
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
