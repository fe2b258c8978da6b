"""ftwt: dynamic channel pruning (Fire Together Wire Together, CVPR'22) for timm and torchvision CNNs.

Public API::

    import ftwt_cli
    model = ftwt_cli.load("ftwt-run")      # -> GatedModel (an nn.Module)
    model.set_gates("predict")             # "open" | "predict" | "oracle" (with r=...)
    y = model(x); model.last_stats.macs    # per-sample MACs of that forward

The package reads top to bottom as the pipeline: ``io`` (checkpoints, run directory, export, load) → ``arch``
(registry, dataflow trace) → ``gating`` (gate, gated model, ground truth, MACs) → ``train`` → ``eval`` → ``fast``
(compact inference); ``cli`` wraps it.
"""
__version__ = "0.2.0"

from .errors import FtwtError
from .gating import ForwardStats, Gate, GatedModel
from .io import RunMeta, load

__all__ = ["__version__", "load", "GatedModel", "Gate", "ForwardStats", "RunMeta", "FtwtError"]
