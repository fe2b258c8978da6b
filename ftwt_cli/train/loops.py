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

Loss (FTWT eq. 2): L_pred = mean over layers l of Σ_f BCEWithLogits(P_f^l, g_f^l), averaged over the batch
(``loss.gate_loss``); autograd computes every gradient and ``torch.optim`` steps.

Both phases save a resumable checkpoint every epoch; shuffling and augmentation are seeded from
(seed, epoch), so ``resume`` continues exactly where a run stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import DataSplits, check_classes, default_workers, make_loader, open_data, size_note
from ..errors import FtwtError
from ..eval.budget import calibration_batches, find_r
from ..eval.evaluate import EvalResult, evaluate_loader
from ..eval.source import measure_source, to_measure
from ..gating.model import GatedModel
from ..io.meta import EvalSummary, TrainingRecord, environment
from ..io.rundir import atomic_write_text, check_writable, commit, read_meta, read_weights, run_lock
from ..runs.loader import gated_from_meta
from ..runtime.device import Precision, resolve_precision
from ..runtime.dist import Dist, all_sum, average_buffers, barrier, process_group, shard, train_sampler
from .config import FinetuneConfig, FitGatesConfig
from .loss import distill_loss, gate_loss

__all__ = ["fit_gates", "finetune", "fit_gates_step", "gate_optimizer", "EpochStats", "TrainReport", "Progress",
           "batch_metrics", "METRICS_EVERY", "METRICS_LOG"]
METRICS_LOG = "metrics.jsonl"     # per-epoch metrics of every training command, in the run
# Training-batch metrics (gate agreement, keep ratio, MACs cut) are computed on every N-th batch: counting MACs
# walks every conv of the model, which a GPU step should not wait for on every batch.
METRICS_EVERY = 10


class Progress(Protocol):
    """What the loops report; the CLI draws it, tests may ignore it."""
    def start(self, phase: str, epoch: int, epochs: int, batches: int) -> None: ...
    def step(self, done: int, metrics: Dict[str, float]) -> None: ...     # batches done, running means
    def validating(self) -> None: ...                                       # the epoch's validation pass begins
    def end(self, stats: "EpochStats") -> None: ...
    def note(self, text: str) -> None: ...                                  # something the user should know, once


class _Silent:
    def start(self, *a) -> None: ...
    def step(self, *a) -> None: ...
    def validating(self) -> None: ...
    def end(self, *a) -> None: ...
    def note(self, *a) -> None: ...


@dataclass(frozen=True)
class EpochStats:
    phase: str
    epoch: int                 # 1-based
    loss: float                # BCE (fit-gates) or task + BCE (finetune), mean over batches
    bce: float
    ce: float
    agreement: float           # share of (sample, filter) decisions equal to the ground truth  } means over every
    keep_ratio: float          # mean share of filters kept in gated layers                    } METRICS_EVERY-th
    macs_cut: float            # 1 - mean MACs / dense MACs (gates included)                    } training batch
    val_top1: float
    val_macs_cut: float
    seconds: float


@dataclass(frozen=True)
class TrainReport:
    run_dir: Path
    phase: str
    epochs: List[EpochStats]
    final: EvalResult
    config: Dict[str, Any]
    model: Optional[GatedModel] = None     # the trained model, in memory
    main: bool = True                       # this process is rank 0 (the one that wrote the run and prints)


def batch_metrics(model: GatedModel) -> Dict[str, float]:
    """Of the last forward: gate agreement with the ground truth and keep ratio (each a mean over layers), and
    the MACs cut against the dense model."""
    s, t = model.last_stats, model.last_targets
    out = {"agreement": 1.0, "keep": 1.0, "macs_cut": 1.0 - float(s.macs.mean()) / s.dense_macs}
    names = [n for n in t if n in s.masks]
    if names:
        out["agreement"] = float(torch.stack([(s.masks[n] == t[n]).float().mean() for n in names]).mean())
        out["keep"] = float(torch.stack([s.masks[n].float().mean() for n in names]).mean())
    return out


class _Sums:
    """Per-epoch sums: the loss terms every batch (as tensors, read once), the metrics every METRICS_EVERY-th."""

    def __init__(self) -> None:
        self.loss: Dict[str, torch.Tensor] = {}
        self.metrics: Dict[str, float] = {}
        self.batches = self.measured = 0

    def add(self, model: GatedModel, step: int, losses: Dict[str, torch.Tensor], gated: bool) -> Optional[Dict[str, float]]:
        for k, v in losses.items():
            self.loss[k] = self.loss.get(k, 0.0) + v.detach()
        self.batches += 1
        if step % METRICS_EVERY:
            return None
        m = batch_metrics(model) if gated else {"agreement": 1.0, "keep": 1.0, "macs_cut": 0.0}
        for k, v in m.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + v
        self.measured += 1
        return {**{k: float(v) / self.batches for k, v in self.loss.items()},
                **{k: v / self.measured for k, v in self.metrics.items()}}

    def means(self, d: Dist = Dist(), device: torch.device = torch.device("cpu")) -> Dict[str, float]:
        """Epoch means over every process's batches: sums and counts added up first (not means of means)."""
        tot = all_sum({**{f"loss/{k}": float(v) for k, v in self.loss.items()},
                       **{f"metric/{k}": v for k, v in self.metrics.items()},
                       "batches": self.batches, "measured": self.measured}, d, device)
        return {**{k: tot[f"loss/{k}"] / max(tot["batches"], 1) for k in self.loss},
                **{k: tot[f"metric/{k}"] / max(tot["measured"], 1) for k in self.metrics}}


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


def _teacher(ph: "_Phase") -> nn.Module:
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


def _load_checkpoint(run_dir: Path, name: Optional[str], phase: str) -> Dict[str, Any]:
    p = run_dir / (name or "checkpoint.pt")
    if name is None or not p.is_file():
        raise FtwtError(f"nothing to resume in {run_dir}: no training checkpoint", f"run `ftwt {phase}` without --resume")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FtwtError(f"{p} is damaged ({str(e).splitlines()[0]})", f"run `ftwt {phase}` without --resume") from None
    if ck.get("phase") != phase:
        raise FtwtError(f"the checkpoint in {run_dir} is from `ftwt {ck.get('phase')}`, not `ftwt {phase}`",
                        f"resume with `ftwt {ck.get('phase')} --resume`, or run `ftwt {phase}` without --resume")
    return ck


def _resumed_config(cls: type, saved: Dict[str, Any], given):
    """The interrupted run's settings; a given setting that differs is refused, naming both values (a None field of
    ``given`` counts as not given)."""
    if given is None:
        return cls(**saved)
    for k, v in dataclasses.asdict(given).items():
        if v is not None and k in saved and v != saved[k]:
            raise FtwtError(f"{k.replace('_', '-')}={v!r} conflicts with the interrupted run's {k.replace('_', '-')}={saved[k]!r}",
                            "drop it to continue the run as it was, or start over without --resume")
    return cls(**saved)


def _lr_factor(cfg: FinetuneConfig, step: int, steps_per_epoch: int) -> float:
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":      # half-cosine from lr to 0 over all iterations
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    if cfg.schedule == "step":
        epoch = step // max(steps_per_epoch, 1)
        return cfg.gamma ** sum(epoch >= e for e in cfg.step_epochs)
    return 1.0


class _Phase:
    """What fit-gates and finetune share: the run, data, model, resume state and per-epoch bookkeeping."""

    def __init__(self, phase: str, cls: type, run_dir: Path | str, data: str, cfg, resume: bool,
                 val_split: Optional[float], train_samples: Optional[int], progress: Progress, precision: Precision,
                 dist: Dist = Dist(), check_source: bool = True) -> None:
        """The caller holds the run's lock. ``cfg`` None: the defaults, or on resume the interrupted run's settings."""
        self.phase, self.run_dir, self.data_arg = phase, Path(run_dir), str(data)
        if cfg is not None and not resume:      # on resume, given fields must equal the run's (validated) settings
            cfg.validate()
        self.meta = read_meta(self.run_dir)
        if resume:
            self.ck = _load_checkpoint(self.run_dir, self.meta.files.checkpoint, phase)
            cfg = _resumed_config(cls, self.ck["config"], cfg)
            weights = self.ck["model"]
        else:
            self.ck = None
            cfg = cfg if cfg is not None else cls()
            weights = read_weights(self.run_dir / self.meta.files.weights)
            if cfg.workers is None:       # saved as resolved: resume must load with as many workers (augmentation)
                cfg = dataclasses.replace(cfg, workers=default_workers())
        self.cfg = cfg
        self.dist = dist
        if dist.main:
            check_writable(self.run_dir)      # a read-only run or a full disk fails now, not after an epoch
        self.precision = precision
        self.model = precision.model(gated_from_meta(self.meta, weights))
        self.data: DataSplits = open_data(data, self.meta.data_config, val_split=val_split,
                                          num_classes=self.meta.arch.num_classes, train_samples=train_samples)
        check_classes(self.meta.classes, self.data)
        note = size_note(self.data, self.meta.data_config)
        if note and dist.main:
            progress.note(note)
        if not resume and to_measure(self.meta):
            # first data contact: the source model's own top-1 (near chance stops here, before an epoch is spent)
            if dist.main:
                progress.note(f"measuring the source checkpoint on the {len(self.data.val)} validation images (once)")
            se = measure_source(self.model, self.meta, self.data, batch_size=cfg.batch_size, workers=cfg.workers,
                                precision=precision, dist=dist, check=check_source)
            if se is not None:
                self.meta.source_eval = se
                if dist.main:
                    progress.note(f"source checkpoint: top-1 {se.top1:.2%}, top-5 {se.top5:.2%} on {se.samples} "
                                  f"validation images (every later result is compared with it)")
        self.history: List[Dict[str, Any]] = list(self.ck["history"]) if self.ck else []
        self.extra_state: Dict[str, Any] = {}      # more tensors for the checkpoint (the distillation teacher)
        self.tensorboard = None
        self.start_epoch = int(self.ck["epoch"]) if self.ck else 0

    @contextlib.contextmanager
    def logging(self, tensorboard: bool):
        """Also log each epoch's metrics to TensorBoard (``RUN/tensorboard``) while training."""
        if tensorboard and self.dist.main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise FtwtError("--tensorboard needs the tensorboard package", "pip install tensorboard") from None
            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        try:
            yield
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()

    def train_loader(self, epoch: int):
        torch.manual_seed(self.cfg.seed * 1_000 + epoch)
        sampler = train_sampler(self.data.train, self.dist, self.cfg.seed, epoch) if self.dist.active else None
        return make_loader(self.data.train, self.cfg.batch_size, train=True, workers=self.cfg.workers,
                           seed=self.cfg.seed, epoch=epoch, pin_memory=self.precision.device.type == "cuda", sampler=sampler)

    def val_loader(self):
        return make_loader(shard(self.data.val, self.dist), self.cfg.batch_size, train=False, workers=self.cfg.workers,
                           pin_memory=self.precision.device.type == "cuda")

    def wrap(self) -> nn.Module:
        """The model as the training step calls it: under torchrun, one DDP module over backbone and gates (what
        requires grad now is what it all-reduces); else the model itself."""
        if not self.dist.active:
            return self.model
        from torch.nn.parallel import DistributedDataParallel
        dev = self.precision.device
        return DistributedDataParallel(self.model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def scaler(self) -> Optional[torch.amp.GradScaler]:
        """The float16 loss scaler, with its state when resuming."""
        scaler = self.precision.scaler()
        if scaler is not None and self.ck is not None and "scaler" in self.ck:
            scaler.load_state_dict(self.ck["scaler"])
        return scaler

    def finish_epoch(self, epoch: int, sums: _Sums, seconds: float, optimizers: Dict[str, Any],
                     progress: Progress) -> EpochStats:
        progress.validating()
        average_buffers(self.model, self.dist)         # BatchNorm statistics of all processes' batches
        res = evaluate_loader(self.model, self.val_loader(), precision=self.precision, dist=self.dist)
        avg = sums.means(self.dist, self.precision.device)
        stats = EpochStats(self.phase, epoch, avg.get("loss", 0.0), avg.get("bce", 0.0), avg.get("ce", 0.0),
                           avg.get("agreement", 0.0), avg.get("keep", 1.0), avg.get("macs_cut", 0.0),
                           res.top1, res.reduction, seconds)
        self.history.append(dataclasses.asdict(stats))
        if not self.dist.main:                 # rank 0 alone writes the run
            barrier(self.dist)
            self.last_eval = res
            return stats
        buf = io.BytesIO()
        torch.save({"phase": self.phase, "epoch": epoch, "config": dataclasses.asdict(self.cfg), "history": self.history,
                    "model": self.model.state_dict(), **self.extra_state,
                    **{f"opt_{k}": o.state_dict() for k, o in optimizers.items() if k != "scaler" and o is not None},
                    **({"scaler": scaler.state_dict()} if (scaler := optimizers.get("scaler")) is not None else {})}, buf)
        g = self.meta.gating
        if self.model.mode == "predict":
            g.mode = "predict"
        g.r, g.gt = self.model.r, self.model.gt
        if self.phase == "finetune":
            g.decoupled = self.cfg.mode == "decoupled"
        self.meta.training[self.phase] = TrainingRecord(dataclasses.asdict(self.cfg), self.data_arg, self.data.source, self.history)
        self.meta.last_eval = EvalSummary(self.phase, epoch, res.top1, res.top5, res.mean_macs, res.dense_macs, res.reduction,
                                          self.data.source, "val", res.samples)
        self.meta.classes = list(self.data.classes)          # checked equal to the run's in __init__, if it had them
        self.meta.environment = environment(str(self.precision.device), self.precision.amp)
        # weights, checkpoint and metadata as one commit: a crash anywhere leaves the last complete epoch
        commit(self.run_dir, self.meta, self.model.state_dict(), f"{self.phase}-e{epoch}", buf.getvalue())
        # the per-epoch log, one JSON object a line, rewritten whole from the committed history
        atomic_write_text(self.run_dir / METRICS_LOG, "".join(json.dumps({"phase": ph, **h}) + "\n"
                                                              for ph, t in self.meta.training.items() for h in t.epochs))
        if self.tensorboard is not None:
            for k, v in dataclasses.asdict(stats).items():
                if isinstance(v, float):
                    self.tensorboard.add_scalar(f"{self.phase}/{k}", v, epoch)
            self.tensorboard.flush()
        barrier(self.dist)
        progress.end(stats)
        self.last_eval = res
        return stats

    def report(self) -> TrainReport:
        if not hasattr(self, "last_eval"):   # nothing left to train (resumed a finished run): still report
            self.last_eval = evaluate_loader(self.model, self.val_loader(), precision=self.precision, dist=self.dist)
        return TrainReport(self.run_dir, self.phase, [EpochStats(**h) for h in self.history], self.last_eval,
                           dataclasses.asdict(self.cfg), self.model, self.dist.main)


def fit_gates(run_dir: Path | str, data: str, cfg: Optional[FitGatesConfig] = None, *, resume: bool = False,
              val_split: Optional[float] = None, train_samples: Optional[int] = None,
              progress: Optional[Progress] = None, tensorboard: bool = False, device: str = "auto", amp: str = "auto",
              channels_last: Optional[bool] = None, check_source: bool = True) -> TrainReport:
    """Train only the gates on the frozen backbone (eval mode, no gradients), with predicted masks applied.
    ``resume`` continues an interrupted run with its own settings (``cfg`` may be None, or must agree with them).
    ``device``, ``amp`` and ``channels_last``: see ``runtime.device``. On the run's first data the source model's
    top-1 is measured and recorded; ``check_source`` stops there when it is near chance (``eval.source``)."""
    with _session("fit-gates", FitGatesConfig, run_dir, data, cfg, resume, val_split, train_samples, progress,
                  tensorboard, device, amp, channels_last, check_source) as (ph, progress):
        return _fit_gates(ph, progress)


@contextlib.contextmanager
def _session(phase: str, cls: type, run_dir, data: str, cfg, resume: bool, val_split: Optional[float],
             train_samples: Optional[int], progress: Optional[Progress], tensorboard: bool, device: str, amp: str,
             channels_last: Optional[bool], check_source: bool = True):
    """One training command's surroundings: the process group joined (under torchrun), the run locked by rank 0,
    the phase set up, logging on; yields (phase, the progress this process reports to)."""
    read_meta(run_dir)                                        # a missing or damaged run fails before the lock
    precision = resolve_precision(device, amp, channels_last)
    with process_group(precision.device) as (d, dev), \
            run_lock(Path(run_dir), f"ftwt {phase}") if d.main else nullcontext():
        progress = (progress or _Silent()) if d.main else _Silent()
        ph = _Phase(phase, cls, run_dir, data, cfg, resume, val_split, train_samples, progress,
                    dataclasses.replace(precision, device=dev), d, check_source=check_source)
        with ph.logging(tensorboard):
            yield ph, progress


def _fit_gates(ph: "_Phase", progress: Progress) -> TrainReport:
    cfg, model = ph.cfg, ph.model
    if not model.units:
        raise FtwtError(f"{ph.run_dir} has no gates (a statically pruned model)", "fine-tune it with `ftwt finetune --dense-control`")
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
        sums, t0 = _Sums(), time.perf_counter()
        for i, (x, _) in enumerate(loader):
            loss = fit_gates_step(model, ph.precision.batch(x), opt, ph.precision, scaler, net)
            m = sums.add(model, i, {"loss": loss, "bce": loss}, gated=True)
            if m is not None:
                progress.step(sums.batches, m)
        ph.finish_epoch(epoch, sums, time.perf_counter() - t0, {"gates": opt, "scaler": scaler}, progress)
    return ph.report()


def _r_for_cut(ph: "_Phase", cfg: FitGatesConfig, progress: Progress):
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
    with _session("finetune", FinetuneConfig, run_dir, data, cfg, resume, val_split, train_samples, progress,
                  tensorboard, device, amp, channels_last, check_source) as (ph, progress):
        if sync_bn:
            if ph.precision.device.type != "cuda":
                raise FtwtError("--sync-bn needs CUDA GPUs (SyncBatchNorm does not train on the CPU)", "drop --sync-bn")
            nn.SyncBatchNorm.convert_sync_batchnorm(ph.model)    # the gating hooks follow the new modules
        return _finetune(ph, dense_control, progress)


def _finetune(ph: "_Phase", dense_control: bool, progress: Progress) -> TrainReport:
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
        sums, t0 = _Sums(), time.perf_counter()
        for i, (x, y) in enumerate(loader):
            x, y = ph.precision.batch(x), y.to(ph.precision.device, non_blocking=True)
            step = (epoch - 1) * steps_per_epoch + i
            for group in backbone_opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(cfg, step, steps_per_epoch)
            with model.collecting(decoupled=decoupled) if not dense_control else nullcontext(), ph.precision.autocast():
                out = net(x)
            ce = F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)
            task = ce
            if teacher is not None:
                with torch.no_grad(), ph.precision.autocast():
                    t_out = teacher(x)
                task = (1.0 - cfg.distill) * ce + cfg.distill * distill_loss(out, t_out, cfg.distill_temp)
            bce = gate_loss(model.last_logits, model.last_targets) if not dense_control else out.new_zeros(())
            gates_learn = not dense_control and step < freeze_step
            # frozen gates stay in the loss with weight 0 (as FTWT does): every gate gets a (zero) gradient each step,
            # which DistributedDataParallel expects
            loss = task + (cfg.bce_weight if gates_learn else 0.0) * bce
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
    return ph.report()
