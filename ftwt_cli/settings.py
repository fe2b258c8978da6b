"""The valid values of ftwt's settings: choice lists and range checks, in one place that imports nothing heavy,
so that the command line can check a flag before torch is imported. The modules that act on a setting import its
list from here."""
from __future__ import annotations

import math
from typing import Optional

from .errors import FtwtError

__all__ = ["GATE_MODES", "GT_RULE_NAMES", "FINETUNE_MODES", "SCHEDULES", "INTERPOLATIONS", "AUGMENTS", "AMP_MODES",
           "GROUP_ORDERS", "STATIC_IMPORTANCES", "check_r", "check_cut"]

GATE_MODES = ("open", "predict", "oracle")                   # who decides the masks
GT_RULE_NAMES = ("mass", "uniform")                          # ground truth: heatmap mass, or a fixed fraction
GROUP_ORDERS = ("cofire", "index")                           # gate groups: channels that fire together, or by index
FINETUNE_MODES = ("decoupled", "joint")
SCHEDULES = ("cosine", "step", "constant")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
AUGMENTS = ("auto", "small", "imagenet", "none")             # training augmentation
AMP_MODES = ("auto", "bf16", "fp16", "off")
STATIC_IMPORTANCES = ("l1", "l2", "taylor", "fpgm")          # Torch-Pruning's filter importance for static twins


def check_r(r: float, flag: Optional[str] = None) -> float:
    """r in (0, 1]: the heatmap mass to keep (the fraction of channels for the uniform rule). ``flag``: the list
    option it came from (``--rs``), named in the error."""
    if not isinstance(r, (int, float)) or isinstance(r, bool) or math.isnan(r) or not 0.0 < r <= 1.0:
        if flag:
            raise FtwtError(f"{flag} value {r:g} is outside (0, 1]", f"e.g. {flag} 0.97,0.95,0.92,0.9")
        raise FtwtError(f"r={r} is outside (0, 1]", "pass --r in (0, 1], e.g. --r 0.95 (1.0 drops only dead channels)")
    return float(r)


def check_cut(cut: float, flag: str = "--target-cut") -> float:
    """A share of MACs to cut, in (0, 1)."""
    if not isinstance(cut, (int, float)) or isinstance(cut, bool) or math.isnan(cut) or not 0.0 < cut < 1.0:
        raise FtwtError(f"{flag} {cut} is outside (0, 1)", f"pass the share of MACs to cut, e.g. {flag} 0.4")
    return float(cut)
