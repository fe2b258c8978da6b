"""Gates, the gated model, ground-truth rules and exact MACs: the method itself, with no files, loops or ranks."""
from .gate import Gate, gate_key
from .macs import MacsBreakdown, count_macs, gated_share
from .model import GATE_MODES, ForwardStats, GatedModel
from .targets import GT_RULES, check_r, ground_truth, heatmap_mass, uniform

__all__ = ["Gate", "gate_key", "GatedModel", "ForwardStats", "GATE_MODES", "count_macs", "gated_share", "MacsBreakdown",
           "GT_RULES", "check_r", "ground_truth", "heatmap_mass", "uniform"]
