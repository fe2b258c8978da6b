"""What fit-gates and finetune share around their loops: the run, its data and model, resume state, and the
end of an epoch (validate, commit the run, log).

``open_phase`` opens the command's session (device, precision, torchrun process group), takes the run's lock on
rank 0 and builds the ``Phase``; the loops in ``loops`` only step. Epoch metrics are sums over every process's
batches (``Sums``); the per-epoch log is ``metrics.jsonl`` in the run, and TensorBoard with ``--tensorboard``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Protocol, Tuple

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ..data import DataChoice, DataSplits, check_classes, default_workers, make_loader, open_data, size_note
from ..errors import FtwtError
from ..eval.evaluate import EvalResult, evaluate_loader
from ..eval.source import measure_source, to_measure
from ..formats.meta import EvalSummary, TrainingRecord, environment
from ..formats.rundir import atomic_write_text, check_writable, commit, read_meta, read_weights, run_lock
from ..gating.model import GatedModel
from ..runs.loader import gated_from_meta
from ..runtime.dist import Dist, all_sum, average_buffers, barrier, shard, train_sampler
from ..runtime.session import Session, session
from .checkpoint import checkpoint_bytes, load_checkpoint, resumed_config

__all__ = ["Phase", "open_phase", "Progress", "Silent", "EpochStats", "TrainReport", "Sums", "batch_metrics",
           "METRICS_EVERY", "METRICS_LOG"]
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


class Silent:
    """A progress that shows nothing (tests, and every process but rank 0)."""

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


class Sums:
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


class Phase:
    """What fit-gates and finetune share: the run, data, model, resume state and per-epoch bookkeeping."""

    def __init__(self, phase: str, cls: type, run_dir: Path | str, data: str, cfg, *, resume: bool, choice: DataChoice,
                 progress: Progress, sess: Session, check_source: bool = True) -> None:
        """The caller holds the run's lock. ``cfg`` None: the defaults, or on resume the interrupted run's settings."""
        precision, dist = sess.precision, sess.dist
        self.phase, self.run_dir, self.data_arg = phase, Path(run_dir), str(data)
        if cfg is not None and not resume:      # on resume, given fields must equal the run's (validated) settings
            cfg.validate()
        self.meta = read_meta(self.run_dir)
        if resume:
            self.ck = load_checkpoint(self.run_dir, self.meta.files.checkpoint, phase)
            cfg = resumed_config(cls, self.ck["config"], cfg)
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
        self.data: DataSplits = open_data(data, self.meta.data_config, choice=choice,
                                          num_classes=self.meta.arch.num_classes)
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
                # optional dependency: --tensorboard needs the tensorboard package
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
        dev = self.precision.device
        return DistributedDataParallel(self.model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def scaler(self) -> Optional[torch.amp.GradScaler]:
        """The float16 loss scaler, with its state when resuming."""
        scaler = self.precision.scaler()
        if scaler is not None and self.ck is not None and "scaler" in self.ck:
            scaler.load_state_dict(self.ck["scaler"])
        return scaler

    def finish_epoch(self, epoch: int, sums: Sums, seconds: float, optimizers: Dict[str, Any],
                     progress: Progress) -> EpochStats:
        """Validate, then (rank 0) commit the epoch to the run and log it; every process returns the epoch's stats."""
        progress.validating()
        average_buffers(self.model, self.dist)         # BatchNorm statistics of all processes' batches
        res = evaluate_loader(self.model, self.val_loader(), precision=self.precision, dist=self.dist)
        avg = sums.means(self.dist, self.precision.device)
        stats = EpochStats(self.phase, epoch, avg.get("loss", 0.0), avg.get("bce", 0.0), avg.get("ce", 0.0),
                           avg.get("agreement", 0.0), avg.get("keep", 1.0), avg.get("macs_cut", 0.0),
                           res.top1, res.reduction, seconds)
        self.history.append(dataclasses.asdict(stats))
        self.last_eval = res
        if self.dist.main:                     # rank 0 alone writes the run
            self._commit(epoch, res, optimizers)
            self._log(stats)
        barrier(self.dist)
        if self.dist.main:
            progress.end(stats)
        return stats

    def _commit(self, epoch: int, res: EvalResult, optimizers: Dict[str, Any]) -> None:
        """Weights, training checkpoint and metadata as one commit: a crash anywhere leaves the last complete epoch."""
        ck = checkpoint_bytes(self.phase, epoch, self.cfg, self.history, self.model.state_dict(), optimizers,
                              self.extra_state)
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
        commit(self.run_dir, self.meta, self.model.state_dict(), f"{self.phase}-e{epoch}", ck)

    def _log(self, stats: EpochStats) -> None:
        """The per-epoch log (one JSON object a line, rewritten whole from the committed history) and TensorBoard."""
        atomic_write_text(self.run_dir / METRICS_LOG, "".join(json.dumps({"phase": ph, **h}) + "\n"
                                                              for ph, t in self.meta.training.items() for h in t.epochs))
        if self.tensorboard is not None:
            for k, v in dataclasses.asdict(stats).items():
                if isinstance(v, float):
                    self.tensorboard.add_scalar(f"{self.phase}/{k}", v, stats.epoch)
            self.tensorboard.flush()

    def report(self) -> TrainReport:
        if not hasattr(self, "last_eval"):   # nothing left to train (resumed a finished run): still report
            self.last_eval = evaluate_loader(self.model, self.val_loader(), precision=self.precision, dist=self.dist)
        return TrainReport(self.run_dir, self.phase, [EpochStats(**h) for h in self.history], self.last_eval,
                           dataclasses.asdict(self.cfg), self.model, self.dist.main)


@contextlib.contextmanager
def open_phase(phase: str, cls: type, run_dir, data: str, cfg, *, resume: bool, choice: DataChoice,
               progress: Optional[Progress], tensorboard: bool, device: str, amp: str, channels_last: Optional[bool],
               check_source: bool = True) -> Iterator[Tuple[Phase, Progress]]:
    """One training command's surroundings: the session opened (the process group joined under torchrun), the run
    locked by rank 0, the phase set up, logging on; yields (phase, the progress this process reports to)."""
    read_meta(run_dir)                                        # a missing or damaged run fails before the lock
    with session(device, amp, channels_last) as sess, \
            run_lock(Path(run_dir), f"ftwt {phase}") if sess.main else nullcontext():
        progress = (progress or Silent()) if sess.main else Silent()
        ph = Phase(phase, cls, run_dir, data, cfg, resume=resume, choice=choice, progress=progress, sess=sess,
                   check_source=check_source)
        with ph.logging(tensorboard):
            yield ph, progress
