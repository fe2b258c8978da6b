"""Static filter pruning with Torch-Pruning: the baseline dynamic gating is measured against at equal MACs.

``plan`` says which channels a pruned model kept (JSON, rebuilt on a fresh copy of the architecture); ``prune``
finds the pruning ratio whose model has a target number of MACs. A static twin as a run: ``runs.static``.
"""
from .plan import PruningPlan, apply_plan
from .prune import IMPORTANCES, StaticOptions, StaticResult, prune_at_ratio, prune_to_macs, taylor_grads

__all__ = ["PruningPlan", "apply_plan", "IMPORTANCES", "StaticOptions", "StaticResult", "prune_at_ratio", "prune_to_macs",
           "taylor_grads"]
