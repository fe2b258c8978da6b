"""A hybrid model: static where the gates' decisions do not vary, dynamic where they do (issue 28, item 5).

From a run with fitted gates, each gated channel's firing rate is measured on training images (evaluation transform)
and the channels are split three ways by a threshold ε ∈ (0, 0.5):

* rate < ε: the channel is **removed physically**: Torch-Pruning cuts its filter, its norm's entries and the input
  channels of every layer that reads it, as for a static twin, so the model is smaller and dense where it was.
  A channel Torch-Pruning couples to other layers' outputs (conv2 of a residual block, masked before the add: its
  channels are the stream's) cannot go on its own; it keeps its gate.
* rate > 1 − ε: the channel **loses its gate** and always runs (``Gate.fixed_open``); the gate computes no logit for
  it, so its cost shrinks too.
* otherwise the gate keeps deciding, with its fitted weights (rows of the channels it still decides, columns of the
  input channels that remain).

A unit whose remaining channels all run always loses its gate entirely. ε → 0.5 leaves no varying channel: the
gates' majority masks made static. The result is a run like any other (its metadata holds the pruning plan,
``meta.static``, and the gates, ``meta.gating``): ``ftwt finetune`` trains it, ``ftwt evaluate`` measures it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .. import __version__
from ..arch.plan import Unit
from ..arch.trace import trace_plan
from ..data import DataChoice, make_loader, open_data
from ..errors import FtwtError
from ..formats.meta import GatingInfo, MacsInfo, RunMeta, StaticInfo, environment
from ..formats.rundir import read_meta, write_new_run
from ..gating.gate import gate_key
from ..gating.model import GatedModel
from ..static.plan import PruningPlan
from ..static.prune import prunable_sizes, record_group, tp_macs
from .loader import load

__all__ = ["HybridReport", "HybridParts", "build_hybrid", "make_hybrid_run", "check_epsilon", "split_channels", "firing_rates", "DEFAULT_IMAGES"]

DEFAULT_IMAGES = 2048        # training images the firing rates are measured on (as a MACs budget's calibration)


@dataclass(frozen=True)
class HybridReport:
    run_dir: Path
    epsilon: float
    images: int                 # training images the firing rates were measured on
    channels: int               # gated channels of the source run (followers not counted)
    removed: int                # removed physically (rate < ε)
    fixed: int                  # run always, no gate (rate > 1 − ε)
    varying: int                # keep their gate
    coupled: int                # rate < ε, but coupled to other layers' outputs: kept, with their gate
    units_gated: int            # units that keep a gate (of the source run's gated units)
    units: int
    dense_macs: float           # the pruned model's MACs with every gate open (no gate cost)
    source_macs: float          # the unpruned model's


def check_epsilon(eps: float) -> float:
    if not 0.0 < eps < 0.5:
        raise FtwtError(f"--epsilon {eps} is outside (0, 0.5)",
                        "pass e.g. --epsilon 0.05 (channels firing on < 5% of images are removed, on > 95% lose their gate)")
    return float(eps)


def split_channels(rate: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dead, fixed) bool masks of one unit's channels: firing on < ε of the images, and on > 1 − ε. A unit keeps at
    least one channel (its most frequent one) so that no layer is emptied."""
    dead, fixed = rate < eps, rate > 1 - eps
    if bool(dead.all()):
        dead = dead.clone()
        dead[int(rate.argmax())] = False
    return dead, fixed


@torch.no_grad()
def firing_rates(model: GatedModel, loader) -> Tuple[Dict[str, torch.Tensor], int]:
    """(unit → (C_out,) share of the images each channel fires on, images seen), with the model's gates deciding."""
    fires: Dict[str, torch.Tensor] = {}
    n = 0
    for x, _ in loader:
        model(x)
        for name, m in model.last_masks.items():
            fires[name] = fires[name] + m.sum(0) if name in fires else m.sum(0).double()
        n += len(x)
    return {k: (v / max(n, 1)).float() for k, v in fires.items()}, n


def _out_fn(module: nn.Module):
    import torch_pruning as tp  # deferred: only hybrids and static twins need Torch-Pruning
    return tp.prune_conv_out_channels if isinstance(module, nn.modules.conv._ConvNd) else tp.prune_linear_out_channels


def _own_group(group, unit: Unit, followers: List[str], names: Dict[nn.Module, str]) -> bool:
    """Whether a Torch-Pruning group cuts only this unit's own outputs (its conv or fc1, the follower depthwise convs
    reading it, their norms) and the inputs of the layers that read them: nothing coupled to another unit's output."""
    own = {unit.name, *followers}
    for dep, _ in group:
        m = dep.target.module
        if dep.handler.__name__ == "prune_out_channels" and isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            if names.get(m) not in own:
                return False
    return True


@dataclass(frozen=True)
class HybridParts:
    """What ``build_hybrid`` made: the model, and how each unit's channels went."""
    model: GatedModel                                  # the pruned backbone with the gates that still decide
    plan: PruningPlan                                  # Torch-Pruning's cuts: layer → kept "out" / "in" indices
    removed: Dict[str, torch.Tensor]                   # unit → (C_out,) bool, removed physically
    split: Dict[str, Tuple[torch.Tensor, torch.Tensor]]    # unit → (dead, fixed) by firing rate (``split_channels``)
    coupled: int                                       # dead channels kept (coupled to other layers' outputs)

    @property
    def channels(self) -> int:
        """Gated channels of the source model (followers not counted)."""
        return sum(int(dead.numel()) for dead, _ in self.split.values())

    @property
    def n_removed(self) -> int:
        return sum(int(m.sum()) for m in self.removed.values())

    @property
    def n_fixed(self) -> int:
        """Channels kept that run without a gate."""
        return sum(int((f & ~self.removed.get(n, torch.zeros_like(f))).sum()) for n, (_, f) in self.split.items())


def build_hybrid(model: GatedModel, fired: Dict[str, torch.Tensor], eps: float, size: Tuple[int, int, int]) -> HybridParts:
    """The hybrid of ``model`` (in memory, on the CPU) from each unit's firing rates ``fired`` (unit → (C_out,) share
    of images), at threshold ``eps``, traced at ``size`` (C, H, W). ``make_hybrid_run`` measures the rates on
    training images and writes the result as a run; a benchmark may pass rates of its own."""
    import torch_pruning as tp  # deferred: only hybrids and static twins need Torch-Pruning
    if any(u.kind == "stream" for u in model.units):
        raise FtwtError("a hybrid of residual-stream units is not built: removing a stream channel prunes every block "
                        "of its stage together", "make the hybrid from a run attached without --residual-stream")
    leaders = [u for u in model.units if not u.follows]
    followers = {u.name: [f.name for f in model.units if f.follows == u.name] for u in leaders}
    rates = {u.name: fired[u.name].cpu() for u in leaders}

    # 1. physical removal of the channels that (nearly) never fire, one Torch-Pruning group per unit
    backbone = model.plain_backbone()
    dg = tp.DependencyGraph().build_dependency(backbone, example_inputs=torch.zeros(1, *size))
    names = {m: n for n, m in backbone.named_modules()}
    sizes = prunable_sizes(dg, names)
    layers: Dict[str, Dict[str, List[int]]] = {}
    split = {n: split_channels(r, eps) for n, r in rates.items()}
    removed: Dict[str, torch.Tensor] = {}
    coupled = 0
    for u in leaders:
        dead = split[u.name][0]
        if not bool(dead.any()):
            continue
        module = backbone.get_submodule(u.name)
        group = dg.get_pruning_group(module, _out_fn(module), idxs=dead.nonzero().flatten().tolist())
        if u.kind == "glu" or not _own_group(group, u, followers[u.name], names) or not dg.check_pruning_group(group):
            coupled += int(dead.sum())
            continue
        record_group(group, names, sizes, layers)
        group.prune()
        removed[u.name] = dead
    plan_kept = PruningPlan("firing-rate", layers, {n: {k: int(sizes[n][k]) for k in d} for n, d in layers.items()})

    # 2. which units keep a gate, and how many of their channels run without one
    fixed_open: Dict[str, int] = {}
    gated: List[str] = []
    for u in leaders:
        dead, fixed = split[u.name]
        keep = ~removed.get(u.name, torch.zeros_like(dead))
        varying = keep & ~fixed
        if bool(varying.any()):
            gated += [u.name, *followers[u.name]]
            if int((keep & fixed).sum()):
                fixed_open[u.name] = int((keep & fixed).sum())
    traced = trace_plan(backbone, size, gate_shortcuts=True, depthwise_follow=any(u.follows for u in model.units))
    by_name = {u.name: u for u in traced.units}
    lost = [n for n in gated if n not in by_name]
    if lost:
        raise FtwtError(f"after pruning, {lost[0]} is no longer a gateable unit", "pass a smaller --epsilon")
    traced.units = [by_name[n] for n in gated]
    gated = [n for n in (u.name for u in model.units) if n in set(gated)]       # forward order
    hybrid = GatedModel(backbone, traced, gated, group_size=model.group_size, fixed_open=fixed_open)

    # 3. the surviving gates keep their fitted weights: the rows of the groups that still decide, the columns of
    # the input channels that remain
    with torch.no_grad():
        for u in leaders:
            if u.name not in gated:
                continue
            old, new = model.gates[gate_key(u.name)], hybrid.gates[gate_key(u.name)]
            fixed = split[u.name][1]
            kept_out = torch.tensor(layers.get(u.name, {}).get("out", list(range(u.out_channels))), dtype=torch.long)
            kept_in = torch.tensor(layers.get(u.name, {}).get("in", list(range(u.in_channels))), dtype=torch.long)
            group_of = old.group_of.cpu() if old.group_of is not None else torch.arange(u.out_channels)
            g_out = group_of[kept_out]
            vary = ~fixed[kept_out]
            rows = torch.unique(g_out[vary])                      # ascending: the groups that still decide
            new.fc.weight.copy_(old.fc.weight.detach().cpu()[rows][:, kept_in])
            new.fc.bias.copy_(old.fc.bias.detach().cpu()[rows])
            if new.group_of is not None:
                remap = torch.full((old.groups + 1,), len(rows), dtype=torch.long)
                remap[rows] = torch.arange(len(rows))
                new.group_of.copy_(torch.where(vary, remap[g_out], torch.full_like(g_out, len(rows))))
    hybrid.set_gates("predict", r=model.r, gt=model.gt)
    return HybridParts(hybrid, plan_kept, removed, split, coupled)


def make_hybrid_run(source_run: Path | str, data: str, run_dir: Path | str, *, epsilon: float = 0.05,
                    images: int = DEFAULT_IMAGES, batch_size: int = 128, workers: Optional[int] = None,
                    force: bool = False, choice: DataChoice = DataChoice()) -> HybridReport:
    """Measure the firing rates of ``source_run``'s fitted gates on ``images`` training images of ``data``, remove
    the channels firing on < ε of them, drop the gates of those firing on > 1 − ε, and write the result as the new
    run ``run_dir`` (module doc). ``choice``: the training commands' held-out share and training subset."""
    eps = check_epsilon(epsilon)
    if images < 1:
        raise FtwtError(f"--images {images} must be positive", "pass e.g. --images 2048")
    source_run, run_dir = Path(source_run), Path(run_dir)
    meta = read_meta(source_run)
    if meta.static is not None:
        raise FtwtError(f"{source_run} is already pruned (a static twin or a hybrid)", "pass a run with fitted gates")
    if meta.gating.mode != "predict" or not meta.gating.gated:
        raise FtwtError(f"{source_run} has no fitted gates", f"run `ftwt fit-gates --run {source_run}` first")
    if any(u.kind == "stream" for u in meta.plan.units):
        raise FtwtError(f"{source_run} gates residual-stream units (attach --residual-stream), whose hybrid is not built",
                        "make the hybrid from a run attached without --residual-stream")
    model = load(source_run).set_gates("predict")
    cfg = meta.data_config
    splits = open_data(data, cfg, choice=choice, num_classes=meta.arch.num_classes)
    fired, seen = firing_rates(model, make_loader(splits.calibration(cfg, images), batch_size, train=False, workers=workers))
    size = tuple(cfg.input_size)
    h = build_hybrid(model, {n: r.cpu() for n, r in fired.items()}, eps, size)
    hybrid = h.model
    leaders = [u for u in model.units if not u.follows]
    gated, fixed_open, backbone = hybrid.gated_names, hybrid.fixed_open, hybrid.backbone
    source_macs = float(model.dense_macs(size).total[0])
    dense = float(hybrid.dense_macs(size).total[0])
    n_ch, n_removed, n_fixed = h.channels, h.n_removed, h.n_fixed
    g = meta.gating
    new = RunMeta(
        arch=meta.arch, source=meta.source, data_config=cfg,
        gating=GatingInfo(gated, [{"name": u.name, "in_channels": u.in_channels, "out_channels": u.out_channels,
                                   "kernel": list(u.kernel), "groups": u.groups} for u in hybrid.units],
                          "predict", g.r, g.gt, g.decoupled, g.group_size, fixed_open),
        plan=hybrid.plan, macs=MacsInfo(dense, hybrid.gate_macs_dense(), list(size)),
        history=[*meta.history, {"command": "hybrid", "epsilon": eps, "images": seen, "data": data,
                                 "from_run": str(source_run), "ftwt_version": __version__}],
        training=dict(meta.training), classes=meta.classes or list(splits.classes), environment=environment(),
        source_eval=meta.source_eval,
        static=StaticInfo("firing-rate", dense, dense, tp_macs(backbone, torch.zeros(1, *size)), n_removed / max(n_ch, 1), source_macs,
                          h.plan.to_dict()),
        ftwt_version=__version__)
    write_new_run(run_dir, new, hybrid.state_dict(), force=force, inputs=[source_run])
    n_vary = n_ch - n_removed - n_fixed
    return HybridReport(run_dir, eps, seen, n_ch, n_removed, n_fixed, n_vary, h.coupled,
                        len([u for u in leaders if u.name in gated]), len(leaders), dense, source_macs)
