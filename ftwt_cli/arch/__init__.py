"""Architectures: the timm/torchvision registry, detection of a bare state dict, the input a model expects, and the
dataflow tracer with its Plan."""
from .dataconfig import DataConfig, resolve_data_config
from .detect import Detection, detect_arch
from .plan import MacOp, Plan, Unit, expr_width
from .registry import ArchSpec, build_model, parse_arch
from .trace import trace_plan

__all__ = ["ArchSpec", "DataConfig", "Detection", "build_model", "detect_arch", "parse_arch", "resolve_data_config",
           "Plan", "Unit", "MacOp", "trace_plan", "expr_width"]
