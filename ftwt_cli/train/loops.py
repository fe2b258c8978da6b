"""The two training phases of FTWT, as plain functions the CLI wraps.

fit-gates: the backbone is frozen (eval mode, no gradients); only the gates learn, from the BCE between
their logits and the heatmap-mass ground truth of their own unit. Predicted masks are applied while fitting,
so each gate learns on the inputs it will see at inference.

finetune: the backbone trains with hard masks (cross-entropy, BN in train mode) while the gates keep learning
on BCE with their own optimiser; ``freeze_gates_at`` < 1 stops them part-way, as FTWT does at half-way.
Optional knowledge distillation (``distill`` = α > 0) mixes the task loss with the KL divergence to the
frozen starting model's softened outputs (Hinton et al. 2015): (1 − α)·CE(s, y) + α·T²·KL(softmax(t/T) ‖
softmax(s/T)); the dense control gets the same teacher. Decoupled (default): the gate reads a detached input,
so BCE never reaches the backbone and the task loss never reaches the gates (the mask is a hard, gradient-free
0/1). Joint: BCE also trains the backbone through the gate's input.

Task-aware gates (``task_aware``, beyond FTWT, as DGNet): the masks are straight-through (hard forward, sigmoid(logit)'s
gradient backward), so the task loss reaches the gates too, and ``target_cut`` adds a MACs budget term, λ·(MACs/dense
− (1 − target_cut))², with the batch's exact MACs (gates included) through the same masks (``loss.budget_loss``).

Loss (FTWT eq. 2): L_pred = mean over layers l of Σ_f BCEWithLogits(P_f^l, g_f^l), averaged over the batch
(``loss.gate_loss``); autograd computes every gradient and ``torch.optim`` steps.

Both phases save a resumable checkpoint every epoch (``checkpoint``; the shared set-up is ``phase``); shuffling and augmentation are seeded from
(seed, epoch), so ``resume`` continues exactly where a run stopped.
"""
from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import DataChoice, make_loader
from ..errors import FtwtError
from ..eval.budget import calibration_batches, find_r
from ..eval.recalibrate import recalibrate_bn
from ..gating.model import GatedModel
from ..runtime.device import Precision
from ..runtime.dist import shard
from .config import FinetuneConfig, FitGatesConfig
from .groups import order_groups
from .loss import budget_loss, distill_loss, gate_loss
from .phase import (
    METRICS_EVERY,
    METRICS_LOG,
    EpochStats,
    Phase,
    Progress,
    Sums,
    TrainReport,
    batch_metrics,
    open_phase,
)

# the loops' neighbours are re-exported: callers reach the training API through one module
__all__ = ["fit_gates", "finetune", "fit_gates_step", "gate_optimizer", "EpochStats", "TrainReport", "Progress",
           "batch_metrics", "METRICS_EVERY", "METRICS_LOG", "gate_loss", "distill_loss", "budget_loss"]


def fit_gates_step(model: GatedModel, x: torch.Tensor, opt: torch.optim.Optimizer,
                   precision: Optional[Precision] = None, scaler: Optional[torch.amp.GradScaler] = None,
                   net: Optional[nn.Module] = None) -> torch.Tensor:
    """One fit-gates step on a model whose backbone does not require grad: a forward with predicted masks that also
    scores channels for the ground truth (under ``precision``'s autocast), the float32 BCE of the gates' logits
    against it, and one optimiser step (through ``scaler`` for float16). ``net``: the model as wrapped by
    DistributedDataParallel, whose forward all-reduces the gates' gradients."""
    with model.collecting(decoupled=True), (precision.autocast() if precision is not None else nullcontext()):
        (net or model)(x)
    loss = gate_loss(model.last_logits, model.last_targets)
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    return loss.detach()


def gate_optimizer(model: GatedModel, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam over the gates; the fused kernel updates all gate tensors at once."""
    return torch.optim.Adam(model.gates.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def _check_budget(model: GatedModel, cfg: FinetuneConfig, input_size) -> float:
    """The dense model's per-sample MACs at the training input size, once the budget is known to be reachable: with
    every gated channel closed (gates still running) the cut is the most any mask can give."""
    dense = float(model.dense_macs(tuple(input_size)).total[0])
    most = 1.0 - model.closed_macs(tuple(input_size)) / dense
    if cfg.target_cut > most:
        raise FtwtError(f"--target-cut {cfg.target_cut} cannot be reached: with every gated channel closed this model "
                        f"cuts {most:.1%} of its MACs (gates included)", f"pass --target-cut below {most:.3f}")
    return dense


def _teacher(ph: "Phase") -> nn.Module:
    """The frozen model finetune starts from (every gate open); saved in the checkpoint so resume uses the same."""
    teacher = ph.model.plain_backbone()
    if ph.ck is not None:
        if "teacher" not in ph.ck:
            raise FtwtError(f"the checkpoint in {ph.run_dir} was written without --distill",
                            "resume without --distill, or run `ftwt finetune` again without --resume")
        teacher.load_state_dict(ph.ck["teacher"])
    teacher.requires_grad_(False)
    ph.extra_state["teacher"] = teacher.state_dict()
    return teacher.eval()


def _lr_factor(cfg: FinetuneConfig, step: int, steps_per_epoch: int) -> float:
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":      # half-cosine from lr to 0 over all iterations
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    if cfg.schedule == "step":
        epoch = step // max(steps_per_epoch, 1)
        return cfg.gamma ** sum(epoch >= e for e in cfg.step_epochs)
    return 1.0


def fit_gates(run_dir: Path | str, data: str, cfg: Optional[FitGatesConfig] = None, *, resume: bool = False,
              val_split: Optional[float] = None, train_samples: Optional[int] = None,
              progress: Optional[Progress] = None, tensorboard: bool = False, device: str = "auto", amp: str = "auto",
              channels_last: Optional[bool] = None, check_source: bool = True) -> TrainReport:
    """Train only the gates on the frozen backbone (eval mode, no gradients), with predicted masks applied.
    ``resume`` continues an interrupted run with its own settings (``cfg`` may be None, or must agree with them).
    ``device``, ``amp`` and ``channels_last``: see ``runtime.device``. On the run's first data the source model's
    top-1 is measured and recorded; ``check_source`` stops there when it is near chance (``eval.source``)."""
    with open_phase("fit-gates", FitGatesConfig, run_dir, data, cfg, resume=resume,
                    choice=DataChoice(val_split, train_samples), progress=progress, tensorboard=tensorboard,
                    device=device, amp=amp, channels_last=channels_last, check_source=check_source) as (ph, progress):
        return _fit_gates(ph, progress)


def _fit_gates(ph: "Phase", progress: Progress) -> TrainReport:
    cfg, model = ph.cfg, ph.model
    if not model.units:
        raise FtwtError(f"{ph.run_dir} has no gates (a statically pruned model)", "fine-tune it with `ftwt finetune --dense-control`")
    if model.group_size > 1 and cfg.group_order == "cofire" and ph.ck is None and ph.meta.gating.mode == "open":
        _order_groups(ph, cfg, progress)                 # fresh gates only: a fitted gate's rows keep their groups
    if cfg.target_cut is not None and ph.ck is None:     # on resume the r found before is in the saved config
        cfg = ph.cfg = dataclasses.replace(cfg, r=_r_for_cut(ph, cfg, progress).r)
    model.set_gates("predict", r=cfg.r, gt=cfg.gt)
    model.backbone.requires_grad_(False)   # autograd then records only the gates: GAP → Linear
    net = ph.wrap()
    opt = gate_optimizer(model, cfg.lr, cfg.weight_decay)
    if ph.ck:
        opt.load_state_dict(ph.ck["opt_gates"])
    scaler = ph.scaler()
    for epoch in range(ph.start_epoch + 1, cfg.epochs + 1):
        loader = ph.train_loader(epoch)
        model.eval()                       # frozen backbone: running BN statistics stay as they are
        progress.start(ph.phase, epoch, cfg.epochs, len(loader))
        sums, t0 = Sums(), time.perf_counter()
        for i, (x, _) in enumerate(loader):
            loss = fit_gates_step(model, ph.precision.batch(x), opt, ph.precision, scaler, net)
            m = sums.add(model, i, {"loss": loss, "bce": loss}, gated=True)
            if m is not None:
                progress.step(sums.batches, m)
        if cfg.recalibrate_bn:
            _recalibrate(ph, cfg, epoch)
        ph.finish_epoch(epoch, sums, time.perf_counter() - t0, {"gates": opt, "scaler": scaler}, progress)
    return ph.report()


def _recalibrate(ph: "Phase", cfg: FitGatesConfig, epoch: int) -> None:
    """BatchNorm statistics under this epoch's predicted masks, on a fixed subset of the training images (a new one
    each epoch, seeded, so a resumed run recalibrates on the same images)."""
    ds = ph.data.calibration(ph.meta.data_config, cfg.recalibrate_bn, cfg.seed * 1_000 + epoch)
    loader = make_loader(shard(ds, ph.dist), cfg.batch_size, train=False, workers=cfg.workers,
                         pin_memory=ph.precision.device.type == "cuda")
    recalibrate_bn(ph.model, loader, ph.precision, ph.dist)


def _order_groups(ph: "Phase", cfg: FitGatesConfig, progress: Progress) -> None:
    """Channels into groups that fire together, on the calibration images, by the ground truth at ``cfg.r``."""
    ds = ph.data.calibration(ph.meta.data_config, cfg.calib_samples, cfg.seed)
    before, after = order_groups(ph.model, calibration_batches(ds, cfg.batch_size, cfg.workers, ph.dist), cfg.r,
                                 cfg.gt, ph.precision, ph.dist)
    progress.note(f"channel groups of {ph.model.group_size} ordered by co-firing on {len(ds)} training images: a "
                  f"channel's ground truth agrees with its group's other members on {after:.1%} of them "
                  f"({before:.1%} in index order)")


def _r_for_cut(ph: "Phase", cfg: FitGatesConfig, progress: Progress):
    """The r whose oracle masks cut ``cfg.target_cut`` of the MACs on a calibration subset of the training data."""
    ds = ph.data.calibration(ph.meta.data_config, cfg.calib_samples, cfg.seed)
    batches = calibration_batches(ds, cfg.batch_size, cfg.workers, ph.dist)
    choice = find_r(ph.model, batches, cfg.target_cut, precision=ph.precision, dist=ph.dist)
    progress.note(choice.describe())
    return choice


def finetune(run_dir: Path | str, data: str, cfg: Optional[FinetuneConfig] = None, *, resume: bool = False,
             val_split: Optional[float] = None, train_samples: Optional[int] = None, dense_control: bool = False,
             progress: Optional[Progress] = None, tensorboard: bool = False, device: str = "auto", amp: str = "auto",
             channels_last: Optional[bool] = None, sync_bn: bool = False, check_source: bool = True) -> TrainReport:
    """Train the backbone under hard masks (task loss) while the gates keep learning (BCE, their own optimiser).
    ``dense_control`` trains the backbone with every gate open and no gate loss: the same extra training,
    without gating, for a fair accuracy comparison. ``resume``, ``device``, ``amp``, ``channels_last`` as for
    ``fit_gates``; ``sync_bn`` (under torchrun on GPUs) computes BatchNorm statistics over all processes' batches."""
    with open_phase("finetune", FinetuneConfig, run_dir, data, cfg, resume=resume,
                    choice=DataChoice(val_split, train_samples), progress=progress, tensorboard=tensorboard,
                    device=device, amp=amp, channels_last=channels_last, check_source=check_source) as (ph, progress):
        if sync_bn:
            if ph.precision.device.type != "cuda":
                raise FtwtError("--sync-bn needs CUDA GPUs (SyncBatchNorm does not train on the CPU)", "drop --sync-bn")
            nn.SyncBatchNorm.convert_sync_batchnorm(ph.model)    # the gating hooks follow the new modules
        return _finetune(ph, dense_control, progress)


def _finetune(ph: "Phase", dense_control: bool, progress: Progress) -> TrainReport:
    cfg, model = ph.cfg, ph.model
    g = ph.meta.gating
    if dense_control:
        model.set_gates("open")
    elif not model.units:
        raise FtwtError(f"{ph.run_dir} has no gates (a statically pruned model)", "fine-tune it with --dense-control")
    else:
        if g.mode != "predict" and not ph.ck:
            raise FtwtError(f"the gates in {ph.run_dir} are not fitted yet", "run `ftwt fit-gates --data ...` first")
        model.set_gates("predict", r=cfg.r if cfg.r is not None else g.r or 0.95, gt=cfg.gt or g.gt or "mass")
    decoupled = cfg.mode == "decoupled"
    task_aware = cfg.task_aware and not dense_control      # the control has no gates for the task loss to reach
    if cfg.bce_weight is None:          # resolved once and saved, so a resumed run keeps it
        cfg = ph.cfg = dataclasses.replace(cfg, bce_weight=0.0 if task_aware and cfg.target_cut is not None else 1.0)
    dense = _check_budget(model, cfg, ph.meta.data_config.input_size) if task_aware and cfg.target_cut is not None else None
    backbone_opt = torch.optim.SGD(model.backbone.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gate_opt = gate_optimizer(model, cfg.gate_lr) if model.units else None     # a static model has no gates
    if ph.ck:
        backbone_opt.load_state_dict(ph.ck["opt_backbone"])
        if gate_opt is not None:
            gate_opt.load_state_dict(ph.ck["opt_gates"])
    teacher = _teacher(ph) if cfg.distill > 0 else None
    scaler = ph.scaler()          # float16: one scaler for both optimisers, one update() a step
    if dense_control:
        model.gates.requires_grad_(False)  # open gates never run: nothing of theirs for DDP to wait for
    net = ph.wrap()
    steps_per_epoch = len(ph.train_loader(ph.start_epoch + 1))     # this process's batches (a shard under torchrun)
    freeze_step = round(cfg.freeze_gates_at * cfg.epochs * steps_per_epoch)   # gates learn before this step
    for epoch in range(ph.start_epoch + 1, cfg.epochs + 1):
        loader = ph.train_loader(epoch)
        model.train()
        progress.start(ph.phase, epoch, cfg.epochs, len(loader))
        sums, t0 = Sums(), time.perf_counter()
        for i, (x, y) in enumerate(loader):
            x, y = ph.precision.batch(x), y.to(ph.precision.device, non_blocking=True)
            step = (epoch - 1) * steps_per_epoch + i
            for group in backbone_opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(cfg, step, steps_per_epoch)
            gates_learn = not dense_control and step < freeze_step
            # straight-through masks only while the gates learn: frozen gates need no gradient from the task loss
            ste = task_aware and gates_learn
            with (model.collecting(decoupled=decoupled, straight_through=ste) if not dense_control else nullcontext(),
                  ph.precision.autocast()):
                out = net(x)
            ce = F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)
            task = ce
            if teacher is not None:
                with torch.no_grad(), ph.precision.autocast():
                    t_out = teacher(x)
                task = (1.0 - cfg.distill) * ce + cfg.distill * distill_loss(out, t_out, cfg.distill_temp)
            bce = gate_loss(model.last_logits, model.last_targets) if not dense_control else out.new_zeros(())
            # frozen gates stay in the loss with weight 0 (as FTWT does): every gate gets a (zero) gradient each step,
            # which DistributedDataParallel expects
            loss = task + (cfg.bce_weight if gates_learn else 0.0) * bce
            if ste and dense is not None:
                loss = loss + cfg.budget_weight * budget_loss(model.differentiable_macs(), dense, cfg.target_cut)
            backbone_opt.zero_grad(set_to_none=True)
            if gate_opt is not None:
                gate_opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(backbone_opt)
                if gates_learn:
                    scaler.step(gate_opt)
                scaler.update()
            else:
                loss.backward()
                backbone_opt.step()
                if gates_learn:
                    gate_opt.step()
            m = sums.add(model, i, {"loss": loss, "ce": ce, "bce": bce}, gated=not dense_control)
            if m is not None:
                progress.step(sums.batches, m)
        ph.finish_epoch(epoch, sums, time.perf_counter() - t0,
                        {"backbone": backbone_opt, "gates": gate_opt, "scaler": scaler}, progress)
    rep = ph.report()
    if dense is not None and abs(rep.final.reduction - cfg.target_cut) > 0.02 and rep.main:
        # the BCE, summed over filters, can outweigh the budget term by orders of magnitude
        progress.note(f"the cut is {rep.final.reduction:.1%} against --target-cut {cfg.target_cut:g}: the budget term did "
                      f"not hold it (the gate loss at weight {cfg.bce_weight:g} can outweigh it, and frozen gates no longer "
                      f"follow it); pass --bce-weight 0 or a larger --budget-weight (now {cfg.budget_weight:g})")
    return rep
