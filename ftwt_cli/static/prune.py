"""Prune a copy of a model to a target number of MACs with Torch-Pruning (the static twin of a dynamic point).

Torch-Pruning has no MACs target; its ImageNet recipe steps a pruner until its MACs count reaches one. Here the
per-layer pruning ratio is found by a bracketed search instead (each try prunes a fresh copy once, at one ratio, layer by
layer, the classifier's outputs left whole), so the result lands within ``tol`` of the target in ftwt's own MACs
count rather than one step past it. Importance: L1 / L2 filter norms, first-order Taylor (|w · ∂L/∂w| on a
calibration batch) or FPGM (distance to the geometric median), each over Torch-Pruning's coupled groups.

``StaticOptions`` gives the twin Torch-Pruning's strongest settings as choices, so that a dynamic model is never
compared with a weak baseline: ``global_pruning`` (one importance ranking across layers instead of one ratio per layer,
with ``isomorphic`` ranking only among groups of the same structure, as in Torch-Pruning's isomorphic pruning), and
``round_to`` (kept channel counts in multiples of 8 or 16, the kernels' blocks). Taylor importance accumulates its
gradients over every calibration batch given (Torch-Pruning's examples use ~50).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FtwtError
from ..gating.model import model_macs
from ..settings import STATIC_IMPORTANCES
from ..solve import solve_monotone
from .plan import PruningPlan

__all__ = ["IMPORTANCES", "StaticOptions", "StaticResult", "prune_to_macs", "prune_at_ratio", "taylor_grads",
           "prunable_sizes", "record_group", "tp_macs"]

IMPORTANCES = STATIC_IMPORTANCES
MAX_RATIO = 0.95           # at most this share of a layer's channels is removed
# (images, labels), a list of such batches, or their gradients already computed (``taylor_grads``)
Calib = Union[Tuple[torch.Tensor, torch.Tensor], List[Tuple[torch.Tensor, torch.Tensor]], Dict[str, torch.Tensor]]


@dataclass(frozen=True)
class StaticOptions:
    """Torch-Pruning's settings beyond the importance (defaults: one ratio for every layer, no rounding)."""
    global_pruning: bool = False
    isomorphic: bool = False
    round_to: Optional[int] = None

    def validate(self) -> None:
        if self.isomorphic and not self.global_pruning:
            raise FtwtError("isomorphic pruning ranks groups across layers", "pass global pruning with it (--static-global)")
        if self.round_to is not None and self.round_to not in (2, 4, 8, 16, 32, 64):
            raise FtwtError(f"--static-round-to {self.round_to} is not a power of two between 2 and 64",
                            "pass e.g. --static-round-to 8")

    @property
    def label(self) -> str:
        """How a point's name spells these settings ('' for the defaults): -global, -iso, -r8."""
        return ("-global" if self.global_pruning else "") + ("-iso" if self.isomorphic else "") + \
               (f"-r{self.round_to}" if self.round_to else "")


@dataclass(frozen=True)
class StaticResult:
    model: nn.Module       # the pruned copy, eval mode
    plan: PruningPlan
    macs: float            # ftwt's count (ptflops' aten convention)
    tp_macs: float         # Torch-Pruning's own count of its conv and linear layers, for comparison
    ratio: float           # the per-layer pruning ratio found
    target_macs: float


def _importance(name: str):
    import torch_pruning as tp  # deferred: only static twins need Torch-Pruning
    if name not in IMPORTANCES:
        raise FtwtError(f"unknown static importance '{name}'", f"use one of {', '.join(IMPORTANCES)}")
    return {"l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
            "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
            "taylor": lambda: tp.importance.GroupTaylorImportance(),
            "fpgm": lambda: tp.importance.FPGMImportance()}[name]()


def taylor_grads(model: nn.Module, calib: Calib) -> Dict[str, torch.Tensor]:
    """∂CE/∂w of ``model`` averaged over the calibration batches (the Taylor importance's gradients), by parameter."""
    work = copy.deepcopy(model).eval()
    work.zero_grad(set_to_none=True)
    batches = calib if isinstance(calib, list) else [calib]
    with torch.enable_grad():
        for x, y in batches:                  # gradients add up over the batches
            (F.cross_entropy(work(x), y) / len(batches)).backward()
    return {n: prm.grad.detach().clone() for n, prm in work.named_parameters() if prm.grad is not None}


def prunable_sizes(dg, names: Dict[nn.Module, str]) -> Dict[str, Dict[str, Optional[int]]]:
    """The output and input channel counts of every module Torch-Pruning's dependency graph ``dg`` can prune, by name."""
    return {n: {"out": dg.get_out_channels(m), "in": dg.get_in_channels(m)}
            for m, n in names.items() if dg.get_pruner_of_module(m) is not None and m in dg.module2node}


def record_group(group, names: Dict[nn.Module, str], sizes: Mapping[str, Mapping[str, Optional[int]]],
                 layers: Dict[str, Dict[str, List[int]]]) -> None:
    """Add what one Torch-Pruning group cuts to a plan's kept indices (``layers``, in the source's numbering), before
    the group is pruned: groups applied one after another index the layers as the earlier ones left them."""
    import torch_pruning as tp  # deferred: only static twins and hybrids need Torch-Pruning
    for dep, idxs in group:
        name = names.get(dep.target.module)
        if name is None or name not in sizes:          # functional ops (add, reshape): nothing stored
            continue
        kind = "out" if dep.handler.__name__ == "prune_out_channels" else "in"
        if sizes[name][kind] is None:
            continue
        drop = set(tp._helpers.to_plain_idxs(idxs) if idxs and isinstance(idxs[0], tp._helpers._HybridIndex) else idxs)
        kept = layers.setdefault(name, {}).setdefault(kind, list(range(sizes[name][kind])))
        layers[name][kind] = [k for i, k in enumerate(kept) if i not in drop]


def prune_at_ratio(source: nn.Module, example: torch.Tensor, ratio: float, importance: str = "l1",
                   ignored: Sequence[str] = (), calib: Optional[Calib] = None,
                   options: StaticOptions = StaticOptions()) -> Tuple[nn.Module, PruningPlan]:
    """A pruned copy of ``source`` with ``ratio`` of every prunable group's channels removed (of all of them, ranked
    together, with global pruning), and its plan. ``calib`` = (images, labels), or a list of such batches, for the
    Taylor importance's gradients."""
    import torch_pruning as tp  # deferred: only static twins need Torch-Pruning
    model = copy.deepcopy(source).eval()
    names = {m: n for n, m in model.named_modules()}
    imp = _importance(importance)
    entered: List[str] = []           # the layers the tracing forward reached: the last one is where it broke
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: entered.append(n)) for n, m in model.named_modules() if n]
    try:
        pruner = tp.pruner.BasePruner(model, example, importance=imp, pruning_ratio=ratio, max_pruning_ratio=MAX_RATIO,
                                      ignored_layers=[model.get_submodule(n) for n in ignored],
                                      round_to=options.round_to, global_pruning=options.global_pruning,
                                      isomorphic=options.isomorphic)
    except Exception as e:
        where = f" at layer {entered[-1]}" if entered else ""
        raise FtwtError(f"Torch-Pruning cannot trace this model{where} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no message'})",
                        "static twins need a model Torch-Pruning supports; the dynamic points do not") from None
    finally:
        for h in hooks:
            h.remove()
    if importance == "taylor":
        if calib is None:
            raise FtwtError("the taylor importance needs a calibration batch", "pass calib=(images, labels)")
        grads = calib if isinstance(calib, dict) else taylor_grads(model, calib)
        for n, prm in model.named_parameters():
            if n in grads:
                prm.grad = grads[n].clone()
    sizes = prunable_sizes(pruner.DG, names)
    layers: Dict[str, Dict[str, List[int]]] = {}
    for group in pruner.step(interactive=True):
        record_group(group, names, sizes, layers)
        group.prune()
    model.zero_grad(set_to_none=True)
    plan = PruningPlan(importance, layers, {n: {k: int(sizes[n][k]) for k in d} for n, d in layers.items()})
    return model.eval(), plan


def prune_to_macs(source: nn.Module, input_size: Tuple[int, int, int], target_macs: float, importance: str = "l1", *,
                  ignored: Sequence[str] = (), calib: Optional[Calib] = None,
                  tol: float = 0.005, count: Optional[Callable[[nn.Module], float]] = None,
                  options: StaticOptions = StaticOptions()) -> StaticResult:
    """Search the per-layer pruning ratio until ftwt's MACs count of the pruned copy is within ``tol`` (relative)
    of ``target_macs``; the closest try is returned if no ratio lands that close (channel counts are integers)."""
    options.validate()
    count = count or (lambda m: model_macs(m, input_size))
    if importance == "taylor" and calib is not None and not isinstance(calib, dict):
        calib = taylor_grads(source, calib)      # once: every try prunes a copy of the same source
    dev = next(source.parameters()).device
    example = torch.zeros(1, *input_size, device=dev)
    best: list = []              # the closest try so far: [ratio, model, plan, macs] (one pruned copy in memory)

    def macs_at(ratio: float) -> float:
        model, plan = prune_at_ratio(source, example, ratio, importance, ignored, calib, options)
        macs = count(model)
        if not best or abs(macs - target_macs) < abs(best[3] - target_macs):
            best[:] = [ratio, model, plan, macs]
        return macs

    dense = count(source)
    if target_macs >= dense:
        raise FtwtError(f"the static target {target_macs / 1e6:.2f} M MACs is not below the model's {dense / 1e6:.2f} M",
                        "aim at fewer MACs than the dense model")
    # the far end of the bracket: the largest ratio, unless Torch-Pruning leaves groups whole there (with rounding, or
    # a global ranking past a layer's maximum, it skips a group it would empty), then the largest ratio below it that
    # reaches the target
    top, least = MAX_RATIO, macs_at(MAX_RATIO)
    for ratio in (0.9, 0.85, 0.8, 0.7, 0.6, 0.5):
        if least <= target_macs * (1 + tol):
            break
        top, least = ratio, min(least, macs_at(ratio))
    if least > target_macs * (1 + tol):
        raise FtwtError(f"static pruning cannot reach {target_macs / 1e6:.2f} M MACs: the fewest it reaches is "
                        f"{least / 1e6:.2f} M", "aim the dynamic point at a smaller cut (a larger r)")
    solve_monotone(macs_at, 0.0, top, dense, least, target_macs, tol * target_macs, max_tries=24, x_tol=1e-4)
    ratio, model, plan, macs = best
    return StaticResult(model, plan, float(macs), tp_macs(model, example), float(ratio), float(target_macs))


def tp_macs(model: nn.Module, example: torch.Tensor) -> float:
    """Torch-Pruning's MACs count restricted to conv and linear layers (its total also counts norms and activations):
    the figure a pruned model's own count is checked against."""
    import torch_pruning as tp  # deferred: only static twins and hybrids need Torch-Pruning
    _, _, per_layer, _ = tp.utils.count_ops_and_params(model, example, layer_wise=True)
    return float(sum(v for m, v in per_layer.items() if v and isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))))
