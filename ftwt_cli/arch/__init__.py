"""Architectures: the timm/torchvision registry view, detection, data config, and the dataflow tracer."""
from .registry import (
           ArchSpec,
           DataConfig,
           Detection,
           build_model,
           detect_arch,
           parse_arch,
           resolve_data_config,
)
from .trace import MacOp, Plan, Unit, expr_width, trace_plan

__all__ = ["ArchSpec", "DataConfig", "Detection", "build_model", "detect_arch", "parse_arch", "resolve_data_config",
           "Plan", "Unit", "MacOp", "trace_plan", "expr_width"]
