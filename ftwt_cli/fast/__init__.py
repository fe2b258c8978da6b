"""Inference only: the compact execution path (only the kept filters are computed) and latency measurement."""
from .calibrate import make_compact
from .compact import STRATEGIES, CompactConv, CompactModel
from .fold import fold_bn, folded_backbone
from .timing import BenchReport, BenchRow, bench, oracle_masks

__all__ = ["CompactModel", "CompactConv", "make_compact", "STRATEGIES", "bench", "oracle_masks", "BenchReport", "BenchRow",
           "fold_bn", "folded_backbone"]
