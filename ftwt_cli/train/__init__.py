"""The two training phases (fit-gates, finetune), their one gate loss, typed configs and recipes."""
from .config import FinetuneConfig, FitGatesConfig, load_recipe, resolve_config
from .loops import (
                    METRICS_EVERY,
                    EpochStats,
                    Progress,
                    TrainReport,
                    batch_metrics,
                    finetune,
                    fit_gates,
                    fit_gates_step,
                    gate_optimizer,
)
from .loss import distill_loss, gate_loss

__all__ = ["fit_gates", "finetune", "FitGatesConfig", "FinetuneConfig", "load_recipe", "resolve_config", "gate_loss",
           "distill_loss", "batch_metrics", "fit_gates_step", "gate_optimizer", "EpochStats", "TrainReport", "Progress",
           "METRICS_EVERY"]
