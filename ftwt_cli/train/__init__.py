"""The two training phases (fit-gates, finetune), their one gate loss, typed configs and recipes, devices and
torchrun. The configs import nothing heavy; the rest is imported on first use (the command line checks its flags
before torch is imported)."""
from importlib import import_module
from typing import Any

from .config import FinetuneConfig, FitGatesConfig, load_recipe, resolve_config

__all__ = ["fit_gates", "finetune", "FitGatesConfig", "FinetuneConfig", "load_recipe", "resolve_config", "gate_loss",
           "distill_loss", "budget_loss", "batch_metrics", "fit_gates_step", "gate_optimizer", "EpochStats", "TrainReport", "Progress",
           "METRICS_EVERY", "METRICS_LOG"]

_WHERE = {"gate_loss": ".loss", "distill_loss": ".loss", "budget_loss": ".loss", **{n: ".loops" for n in (
    "fit_gates", "finetune", "batch_metrics", "fit_gates_step", "gate_optimizer", "EpochStats", "TrainReport", "Progress",
    "METRICS_EVERY", "METRICS_LOG")}}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module 'ftwt_cli.train' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_WHERE])
