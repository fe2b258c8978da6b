"""ftwt: dynamic channel pruning (Fire Together Wire Together, CVPR'22) for timm and torchvision CNNs.

Public API::

    import ftwt_cli
    model = ftwt_cli.load("ftwt-run")      # -> GatedModel (an nn.Module)
    model.set_gates("predict")             # "open" | "predict" | "oracle" (with r=...)
    y = model(x); model.last_stats.macs    # per-sample MACs of that forward
"""
__version__ = "0.1.0"

from .errors import FtwtError
from .gating import ForwardStats, Gate, GatedModel
from .model_io import load

__all__ = ["__version__", "load", "GatedModel", "Gate", "ForwardStats", "FtwtError"]
