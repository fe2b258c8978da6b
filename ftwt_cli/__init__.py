"""ftwt: dynamic pruning (Fire Together Wire Together, CVPR'22) for timm and torchvision classifiers.

Public API::

    import ftwt_cli
    model = ftwt_cli.load("ftwt-run")      # -> GatedModel (an nn.Module)
    model.set_gates("predict")             # "open" | "predict" | "oracle" (with r=...)
    x = ftwt_cli.preprocess(model, "img.png")   # the run's own evaluation transform -> (1, C, H, W)
    y = model(x); model.last_stats.macs    # per-sample MACs of that forward

The package is layered, imports running one way (docs/architecture.md; tests/test_layers.py): ``runtime`` →
``arch`` → ``data``, ``formats`` (file formats) → ``gating`` → ``fast``, ``static``, ``attach`` → ``runs`` (load, export) →
``eval`` → ``train`` → ``sweep``, ``demo`` → ``cli``. The names below are imported on first use, so that importing the package
(as the ``ftwt`` command does before anything else) does not import torch yet.
"""
from importlib import import_module
from typing import Any

__version__ = "0.2.0"

__all__ = ["__version__", "load", "load_static", "preprocess", "GatedModel", "Gate", "ForwardStats", "RunMeta",
           "FtwtError"]

_WHERE = {"load": ".runs", "RunMeta": ".formats", "GatedModel": ".gating", "Gate": ".gating", "ForwardStats": ".gating",
          "FtwtError": ".errors", "load_static": ".runs", "preprocess": ".images"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module 'ftwt_cli' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_WHERE])
