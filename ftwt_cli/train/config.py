"""Typed settings for the training commands, loaded from recipes (YAML) with CLI overrides.

A recipe has one section per command (``fit_gates:``, ``finetune:``) plus free-text ``description``,
``model`` and ``data`` keys. Unknown keys are errors that list the valid ones. The resolved config of every
command is saved in the run's metadata.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Type, TypeVar

from ..errors import FtwtError
from ..settings import FINETUNE_MODES, GROUP_ORDERS, GT_RULE_NAMES, SCHEDULES, check_cut, check_r

__all__ = ["FitGatesConfig", "FinetuneConfig", "load_recipe", "resolve_config", "SCHEDULES", "FINETUNE_MODES"]

_RECIPE_TOP = ("description", "data", "fit_gates", "finetune")   # description: free text for people


@dataclass
class FitGatesConfig:
    r: float = 0.95                 # heatmap-mass threshold in (0, 1] (keep fraction for gt=uniform)
    gt: str = "mass"                # ground-truth rule: mass | uniform
    epochs: int = 2
    lr: float = 0.01                # Adam, gates only
    weight_decay: float = 0.0
    batch_size: int = 128
    workers: Optional[int] = None   # DataLoader processes; None: the machine's default (0 on a 2-core CPU)
    seed: int = 0
    # instead of r: the share of MACs the oracle masks should cut on a calibration subset of the training data;
    # fit-gates finds that r by bisection first and saves it as ``r``
    target_cut: Optional[float] = None
    calib_samples: int = 2048
    # BatchNorm statistics re-estimated under the predicted masks at the end of every epoch, on this many training
    # images with the evaluation transform (``eval.recalibrate``); 0: the dense model's statistics stay
    recalibrate_bn: int = 0
    # gates of channel groups (attach --group-size): before the first epoch, order channels into groups by how they
    # fire together on the calib_samples images (``gating.cofire``), or keep index order (channel c in group c // G)
    group_order: str = "cofire"

    def validate(self) -> None:
        check_r(self.r)
        _non_negative(self, "recalibrate_bn")
        if self.group_order not in GROUP_ORDERS:
            raise FtwtError(f"unknown group order '{self.group_order}'", f"use one of {', '.join(GROUP_ORDERS)}")
        if self.target_cut is not None:
            check_cut(self.target_cut)
        _positive(self, "calib_samples")
        if self.gt not in GT_RULE_NAMES:
            raise FtwtError(f"unknown ground-truth rule '{self.gt}'", f"use one of {', '.join(GT_RULE_NAMES)}")
        _positive(self, "epochs", "lr", "batch_size")
        _non_negative(self, "weight_decay")
        _workers(self)


@dataclass
class FinetuneConfig:
    epochs: int = 1
    lr: float = 0.01                # SGD with momentum for the backbone
    gate_lr: float = 0.001          # Adam for the gates (their own optimiser)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    mode: str = "decoupled"         # decoupled: gates see a detached input; joint: BCE also trains the backbone
    schedule: str = "cosine"        # cosine | step | constant, per iteration
    step_epochs: List[int] = field(default_factory=list)   # epochs at which "step" multiplies lr by gamma
    gamma: float = 0.1
    # None: 1, or 0 for task-aware gates with a budget (the BCE, summed over filters, outweighs the budget term:
    # benchmarks/DYNAMIC-VS-STATIC.md); finetune saves the value it used
    bce_weight: Optional[float] = None
    # FTWT drops the mask-loss weight to 0 after half the epochs: the gates freeze and the backbone finishes
    # training against a fixed gating function. The fraction of finetune's iterations the gates learn for.
    freeze_gates_at: float = 1.0
    label_smoothing: float = 0.0
    distill: float = 0.0            # weight α of knowledge distillation from the frozen starting model (0 = off)
    distill_temp: float = 4.0       # softmax temperature T of the distillation term
    batch_size: int = 128
    workers: Optional[int] = None   # as FitGatesConfig
    seed: int = 0
    r: Optional[float] = None       # default: the r gates were fitted with
    gt: Optional[str] = None
    # task-aware gates (DGNet-style, beyond FTWT): straight-through masks, so the task loss reaches the gates (the hard
    # mask forward, sigmoid(logit)'s gradient backward); the BCE stays as a term of weight bce_weight when one is given
    task_aware: bool = False
    # with task_aware: the share of exact MACs (gates included, batch mean) to cut; adds the budget term
    # budget_weight · (MACs / dense − (1 − target_cut))², the MACs through the straight-through masks (DGNet: λ = 5)
    target_cut: Optional[float] = None
    budget_weight: float = 5.0

    def validate(self) -> None:
        if self.target_cut is not None:
            check_cut(self.target_cut)
            if not self.task_aware:
                raise FtwtError("finetune's --target-cut is a budget term that reaches the gates only through "
                                "straight-through masks", "add --task-aware, or drop --target-cut")
        if not self.budget_weight >= 0:
            raise FtwtError(f"budget-weight={self.budget_weight} is negative", "pass --budget-weight ≥ 0 (default 5)")
        if self.mode not in FINETUNE_MODES:
            raise FtwtError(f"unknown finetune mode '{self.mode}'", f"use one of {', '.join(FINETUNE_MODES)}")
        if self.schedule not in SCHEDULES:
            raise FtwtError(f"unknown schedule '{self.schedule}'", f"use one of {', '.join(SCHEDULES)}")
        if self.r is not None:
            check_r(self.r)
        if self.gt is not None and self.gt not in GT_RULE_NAMES:
            raise FtwtError(f"unknown ground-truth rule '{self.gt}'", f"use one of {', '.join(GT_RULE_NAMES)}")
        _positive(self, "epochs", "lr", "gate_lr", "batch_size", "distill_temp", "gamma")
        _non_negative(self, "momentum", "weight_decay")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise FtwtError(f"label-smoothing={self.label_smoothing} is outside [0, 1)", "pass e.g. --label-smoothing 0.1")
        if any(e < 1 for e in self.step_epochs):
            raise FtwtError(f"step-epochs={self.step_epochs} must be epochs ≥ 1", "e.g. step_epochs: [30, 60]")
        _workers(self)
        if self.bce_weight is not None and not self.bce_weight >= 0:
            raise FtwtError(f"bce-weight={self.bce_weight} is negative", "pass --bce-weight ≥ 0 (1: FTWT's)")
        if not 0.0 <= self.freeze_gates_at <= 1.0:
            raise FtwtError(f"freeze-gates-at={self.freeze_gates_at} is outside [0, 1]",
                            "pass --freeze-gates-at between 0 (gates never learn) and 1 (they learn throughout; FTWT: 0.5)")
        if not 0.0 <= self.distill <= 1.0:
            raise FtwtError(f"distill={self.distill} is outside [0, 1]", "pass --distill between 0 (off) and 1 (distillation only)")


def _positive(cfg, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if not v > 0:
            raise FtwtError(f"{n.replace('_', '-')}={v} must be positive", f"pass --{n.replace('_', '-')} > 0")


def _non_negative(cfg, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if not v >= 0:
            raise FtwtError(f"{n.replace('_', '-')}={v} is negative", f"pass --{n.replace('_', '-')} ≥ 0")


def _workers(cfg) -> None:
    if cfg.workers is not None and not cfg.workers >= 0:
        raise FtwtError(f"workers={cfg.workers} is negative", "pass --workers 0 (load in the main process) or more")


def load_recipe(path: Path | str) -> Dict[str, Any]:
    import yaml  # deferred: only recipes need PyYAML
    path = Path(path)
    if not path.is_file():
        raise FtwtError(f"recipe not found: {path}", "pass a YAML file such as recipes/resnet18-fashion-mnist.yaml")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise FtwtError(f"{path} is not a text file", "pass a YAML recipe such as recipes/resnet18-fashion-mnist.yaml") from None
    except yaml.YAMLError as e:
        raise FtwtError(f"{path} is not valid YAML ({str(e).splitlines()[0]})", "fix the recipe") from None
    if not isinstance(doc, dict):
        raise FtwtError(f"{path} must be a mapping of sections", f"use top-level keys {', '.join(_RECIPE_TOP)}")
    unknown = [k for k in doc if k not in _RECIPE_TOP]
    if unknown:
        raise FtwtError(f"unknown key '{unknown[0]}' in {path}", f"valid top-level keys: {', '.join(_RECIPE_TOP)}")
    doc["_path"] = str(path)
    return doc


T = TypeVar("T")


def resolve_config(cls: Type[T], recipe: Optional[Mapping[str, Any]], section: str, overrides: Mapping[str, Any],
                   *, partial: bool = False) -> T:
    """Defaults ← recipe section ← CLI flags that were given (not None). Unknown recipe keys and values of the wrong
    type are errors. ``partial`` (for ``--resume``): fields given neither by the recipe nor by a flag stay None, and
    the training command checks the given ones against the interrupted run's own settings."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    values: Dict[str, Any] = {n: None for n in names} if partial else {}
    where = f"the recipe {recipe['_path']}" if recipe else "the flags"
    if recipe and recipe.get(section) is not None:
        sec = recipe[section]
        if not isinstance(sec, dict):
            raise FtwtError(f"section '{section}' in {recipe['_path']} must be a mapping", "see recipes/ for examples")
        for k, v in sec.items():
            if k not in names:
                raise FtwtError(f"unknown key '{k}' in section '{section}' of {recipe['_path']}",
                                f"valid keys: {', '.join(names)}")
            values[k] = v
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = cls(**values)
    for f in dataclasses.fields(cls):
        v = getattr(cfg, f.name)
        if v is not None or not partial:
            setattr(cfg, f.name, _typed(f.name, f.type, v, where))
    if not partial:
        cfg.validate()
    return cfg


def _typed(name: str, type_: str, v: Any, where: str) -> Any:
    """``v`` as the field's type: YAML gives ints where floats are meant, and strings for typos."""
    def bad(what: str) -> FtwtError:
        return FtwtError(f"{name}={v!r} must be {what}", f"fix '{name}' in {where}")
    is_int = isinstance(v, int) and not isinstance(v, bool)
    optional = type_.startswith("Optional[")
    base = type_[len("Optional["):-1] if optional else type_
    if v is None:
        if optional:
            return None
        raise bad("given")
    if base == "float":
        if is_int:
            return float(v)
        if not isinstance(v, float):
            raise bad("a number")
    elif base == "int" and not is_int:
        raise bad("an integer")
    elif base == "bool" and not isinstance(v, bool):
        raise bad("true or false")
    elif base == "str" and not isinstance(v, str):
        raise bad("a string")
    elif base == "List[int]" and not (isinstance(v, list) and all(isinstance(e, int) and not isinstance(e, bool) for e in v)):
        raise bad("a list of integers, e.g. [30, 60]")
    return v
