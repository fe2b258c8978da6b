"""A run's evaluation: accuracy, exact MACs and gate behaviour on a data's validation split (and shifts of it),
against the source checkpoint's accuracy, as an ``EvalReport`` (rendered by ``eval.report``)."""
from __future__ import annotations

import dataclasses
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Tuple

import torch
from torch.utils.data import Subset

from ..data import check_classes, make_loader, open_data, size_note
from ..errors import FtwtError
from ..formats.rundir import record_source_eval
from ..runs.loader import load
from ..runtime.dist import shard
from ..runtime.session import Session, session
from ..settings import check_cut
from . import ood as ood_mod
from .budget import calibration_batches, find_r
from .evaluate import EvalResult, evaluate_loader
from .frozen import frozen_masks
from .recalibrate import kept_statistics, recalibrate_bn
from .source import measure_source, to_measure

__all__ = ["EvalReport", "LayerStat", "ShiftResult", "evaluate_run"]


@dataclass(frozen=True)
class LayerStat:
    name: str
    keep_mean: float
    keep_std: float
    precision: Optional[float]     # of "fires" against the ground truth at r (predict mode only)
    recall: Optional[float]


@dataclass(frozen=True)
class ShiftResult:
    shift: str                     # corruption name, or "ood-data"
    severity: int                  # 0 for a dataset shift
    top1_gated: float
    top1_open: float
    macs: float                    # mean per sample, gated
    keep: float                    # mean keep ratio over gated layers


@dataclass(frozen=True)
class EvalReport:
    run_dir: str
    arch: str
    data: str
    samples: int
    gates: str
    r: Optional[float]
    top1: float
    top5: float
    top1_open: float
    top5_open: float
    dense_macs: float
    macs_mean: float
    macs_p10: float
    macs_p50: float
    macs_p90: float
    reduction: float
    gate_macs: float
    keep_mean: float
    layers: Tuple[LayerStat, ...]
    clean_keep: float
    ood: Tuple[ShiftResult, ...] = ()
    macs_per_sample: Tuple[float, ...] = ()
    notes: Tuple[str, ...] = ()           # things the user should know (the images' size far from the model's)
    # the source checkpoint's own accuracy on this data's validation split (None when not measured on this data)
    source_top1: Optional[float] = None
    source_top5: Optional[float] = None
    static: bool = False                  # the run is a statically pruned model (a sweep's static twin)
    static_source_macs: Optional[float] = None   # its unpruned source's MACs
    # diagnostics of predicted gates: the share of gated channels whose firing rate lies in (0.05, 0.95); the top-1 of
    # the gates' majority decisions frozen into one static mask at the same MACs (``eval.frozen``) and those MACs, with
    # BatchNorm statistics re-estimated under that mask on ``frozen_bn_images`` training images (0: the run's own); the
    # mean MACs in FTWT's released counter (``gating.ftwt_count``: the paper's convention, not ftwt's)
    varying_share: Optional[float] = None
    frozen_top1: Optional[float] = None
    frozen_macs: Optional[float] = None
    ftwt_counter_macs: Optional[float] = None
    correct: Tuple[bool, ...] = ()        # per validation image: top-1 right (the sweep's paired test)
    frozen_bn_images: Optional[int] = None

    @property
    def cut_vs_source(self) -> float:
        """The share of the source model's MACs this model saves (a static twin: against its unpruned source)."""
        base = self.static_source_macs or self.dense_macs
        return 1.0 - self.macs_mean / base if base else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("macs_per_sample")
        d.pop("correct")
        return d


def _ticking(batches: Iterable, tick: Optional[Callable[[int], None]]) -> Iterator:
    """``batches``, calling ``tick(images)`` after each (a progress bar's advance)."""
    for b in batches:
        yield b
        if tick:
            tick(len(b[0]) if isinstance(b, (list, tuple)) else len(b))


def _keep_stats(res: EvalResult) -> Tuple[Tuple[LayerStat, ...], float]:
    rows = []
    for name, k in res.keep.items():
        a = res.agreement.get(name, {})
        rows.append(LayerStat(name, float(k.mean()), float(k.std()) if len(k) > 1 else 0.0, a.get("precision"), a.get("recall")))
    mean = sum(r.keep_mean for r in rows) / max(len(rows), 1)
    return tuple(rows), mean


@contextmanager
def _draws(name: str, severity: int) -> Iterator[None]:
    """The CPU random draws of one corruption's pass, fixed by (name, severity) and isolated from the caller's RNG.
    DataLoader workers are seeded by the loader's own generator; without workers the corruptions draw from the
    global RNG in this process, whose state depended on everything run before (and the gated pass moved it before the
    open one, so the two compared different noise)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{name}/{severity}".encode()))
        yield


def evaluate_run(run_dir, data: str, *, gates: str = "predict", r: Optional[float] = None, ood: bool = False,
                 ood_data: Optional[str] = None, corruptions: Sequence[str] = (), severities: Sequence[int] = (1, 2, 3, 4, 5),
                 ood_samples: Optional[int] = 2000, batch_size: int = 256, workers: Optional[int] = None,
                 on_stage: Optional[Callable[[str, int], Callable[[int], None]]] = None, device: str = "auto",
                 amp: str = "auto", channels_last: Optional[bool] = None, target_cut: Optional[float] = None,
                 calib_samples: int = 2048, check_source: bool = True, frozen_bn_images: int = 2048) -> EvalReport:
    """Accuracy, exact MACs and gate behaviour of a run on ``data``'s validation split (and shifts of it).
    ``target_cut`` (oracle gates only): r is the one whose oracle masks cut that share of the MACs on
    ``calib_samples`` training images (``eval.budget.find_r``). ``frozen_bn_images``: the training images the frozen
    majority mask's BatchNorm statistics are re-estimated on (0: it is scored with the run's own statistics, which were
    estimated under the gates' masks, not under it); the run's statistics are put back afterwards.
    ``on_stage(label, samples)`` may return a per-batch callback for progress display. Under torchrun each process
    evaluates its shard and every process returns the whole report. A run that never saw data first measures (and
    records in its ``ftwt.json``) the source checkpoint's top-1; ``check_source`` stops there when it is near chance."""
    if target_cut is not None:
        check_cut(target_cut)
        if gates != "oracle":
            raise FtwtError("--target-cut applies to --gates oracle", "pass --gates oracle, or fit gates with `ftwt fit-gates --target-cut`")
        if r is not None:
            raise FtwtError("--r and --target-cut both given", "pass one of them")
    if gates == "oracle" and r is None and target_cut is None:
        raise FtwtError("--gates oracle needs --r or --target-cut", "pass e.g. --r 0.95, or --target-cut 0.4")
    if frozen_bn_images < 0:
        raise FtwtError(f"--frozen-bn-images {frozen_bn_images} is negative", "pass a number of training images, or 0 to keep the run's statistics")
    with session(device, amp, channels_last) as sess:
        return _evaluate_run(run_dir, data, sess, gates=gates, r=r, ood=ood, ood_data=ood_data, corruptions=corruptions,
                             severities=severities, ood_samples=ood_samples, batch_size=batch_size, workers=workers,
                             on_stage=on_stage, target_cut=target_cut, calib_samples=calib_samples,
                             check_source=check_source, frozen_bn_images=frozen_bn_images)


def _evaluate_run(run_dir, data: str, sess: Session, *, gates: str, r: Optional[float], ood: bool,
                  ood_data: Optional[str], corruptions: Sequence[str], severities: Sequence[int],
                  ood_samples: Optional[int], batch_size: int, workers: Optional[int], on_stage, target_cut: Optional[float],
                  calib_samples: int, check_source: bool, frozen_bn_images: int) -> EvalReport:
    precision, d = sess.precision, sess.dist
    model = precision.model(load(run_dir))
    meta = model.meta
    if gates == "predict" and meta.gating.mode != "predict":
        raise FtwtError(f"the gates in {run_dir} are not fitted yet", "run `ftwt fit-gates` first, or pass --gates oracle/open")
    model.set_gates(gates, r=r)
    cfg = meta.data_config
    splits = open_data(data, cfg, num_classes=meta.arch.num_classes)
    check_classes(meta.classes, splits)
    notes = tuple(n for n in (size_note(splits, cfg),) if n)
    stage = on_stage or (lambda label, n: None)
    first_contact = to_measure(meta)
    source = measure_source(model, meta, splits, batch_size=batch_size, workers=workers, precision=precision, dist=d,
                            check=check_source, on_batch=stage("source checkpoint (open gates)", len(shard(splits.val, d)))
                            if d.main and first_contact else None)
    if source is not None and first_contact and d.main and Path(run_dir).is_dir():
        record_source_eval(Path(run_dir), source)
    if target_cut is not None:
        choice = find_r(model, calibration_batches(splits.calibration(cfg, calib_samples), batch_size, workers, d), target_cut,
                        precision=precision, dist=d)
        r = choice.r
        notes += (choice.describe(),)

    def run(mode: str, ds, label: str, agreement: bool = False) -> EvalResult:
        model.set_gates(mode, r=r if r is not None else model.r)
        return evaluate_loader(model, make_loader(shard(ds, d), batch_size, train=False, workers=workers,
                                                  pin_memory=precision.device.type == "cuda"),
                               with_agreement=agreement, on_batch=stage(label, len(shard(ds, d))) if d.main else None,
                               precision=precision, dist=d)

    main = run(gates, splits.val, f"evaluate ({gates} gates)", agreement=gates == "predict")
    dense = main if gates == "open" else run("open", splits.val, "evaluate (open gates)")
    layers, keep = _keep_stats(main)
    frozen = None
    if gates == "predict" and main.fire_rate:
        masks, frozen_macs = frozen_masks(model, main.fire_rate, main.mean_macs, cfg.input_size)
        model.set_gates("predict", r=r if r is not None else model.r)
        pin = precision.device.type == "cuda"
        # A static mask is judged with the BatchNorm statistics it would have, as a pruned network's are re-estimated:
        # the run's own were estimated under the gates' per-image masks, and scoring the frozen mask with them mostly
        # measures that shift (MobileNetV2, 2 + 2 epochs: 31% with them, 71% re-estimated, against the gates' 73%).
        with kept_statistics(model):
            n_bn = 0                    # training images over all processes (0: no BatchNorm, or not asked for)
            if frozen_bn_images:
                cal = splits.calibration(cfg, frozen_bn_images, seed=0)
                mine = shard(cal, d)
                tick = stage("BatchNorm under the frozen mask", len(mine)) if d.main else None
                seen = recalibrate_bn(model, _ticking(make_loader(mine, batch_size, train=False, workers=workers,
                                                                  pin_memory=pin), tick), precision, d, forced=masks)
                n_bn = len(cal) if seen else 0
            frozen = (evaluate_loader(model, make_loader(shard(splits.val, d), batch_size, train=False, workers=workers,
                                                         pin_memory=pin),
                                      on_batch=stage("frozen majority masks", len(shard(splits.val, d))) if d.main else None,
                                      precision=precision, dist=d, forced=masks), frozen_macs, n_bn)
    shifts = []
    if ood or corruptions:
        names = tuple(corruptions) or ood_mod.DEFAULT_CORRUPTIONS
        for name in names:
            for sev in severities:
                ds = splits.val_with(cfg, ood_mod.corruption(name, sev, small=splits.small))
                if ood_samples is not None and ood_samples < len(ds):
                    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:ood_samples].tolist()
                    ds = Subset(ds, idx)
                # the gated and the open model see the same corrupted images (_draws)
                with _draws(name, sev):
                    g = run(gates, ds, f"{name} s{sev} ({gates})")
                with _draws(name, sev):
                    o = run("open", ds, f"{name} s{sev} (open)")
                shifts.append(ShiftResult(name, sev, g.top1, o.top1, g.mean_macs, _keep_stats(g)[1]))
    if ood_data:
        other = open_data(ood_data, cfg, num_classes=meta.arch.num_classes)
        if other.classes != splits.classes:
            raise FtwtError(f"{other.source} has classes {other.classes[:3]}… but {splits.source} has {splits.classes[:3]}…",
                            "pass --ood-data with the same classes in the same order")
        g, o = run(gates, other.val, f"ood-data ({gates})"), run("open", other.val, "ood-data (open)")
        shifts.append(ShiftResult(f"ood-data:{other.source}", 0, g.top1, o.top1, g.mean_macs, _keep_stats(g)[1]))
    q = torch.quantile(main.macs.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return EvalReport(str(run_dir), str(meta.arch), splits.source, main.samples, gates, model.r if gates != "open" else None,
                      main.top1, main.top5, dense.top1, dense.top5, main.dense_macs, main.mean_macs, q[0], q[1], q[2],
                      main.reduction, main.gate_macs, keep, layers, keep, tuple(shifts), tuple(main.macs.tolist()), notes,
                      source.top1 if source else None, source.top5 if source else None,
                      meta.static is not None and not meta.gating.gated,
                      meta.static.source_macs if meta.static is not None else None,
                      main.varying_share if main.fire_rate else None, frozen[0].top1 if frozen else None,
                      frozen[1] if frozen else None, float(main.ftwt_macs.mean()) if main.ftwt_macs.numel() and main.fire_rate else None,
                      tuple(main.correct.tolist()), frozen_bn_images=frozen[2] if frozen else None)
