"""Run a sweep: one run directory per point under ``out``, resumable point by point.

Points, in order: the dense source model (evaluated as it is); for each r in ``rs`` and each target cut in
``target_cuts`` a dynamic point (attach → oracle estimate → fit-gates → finetune → evaluate) followed, with
``static``, by its static twin (Torch-Pruning prunes the source to the dynamic point's mean MACs → finetune with the
same budget and the dense-control loop → evaluate); with ``dense_control``, the source fine-tuned with the same
budget and every gate open. ``sweep.json`` is rewritten after every step: a re-run skips finished points and resumes
an interrupted one from its run's own state (``--resume`` of the training commands). A point that fails on bad
input is recorded with its reason and the others still run; the first such error is raised at the end.
"""
from __future__ import annotations

import dataclasses
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .. import __version__
from ..attach import attach
from ..data import make_loader, open_data
from ..errors import FtwtError
from ..eval.run import evaluate_run
from ..fast.timing import bench
from ..io.checkpoints import sha256_file
from ..io.rundir import atomic_write_text, is_run, read_meta, record_source_eval, run_lock
from ..runs.loader import load
from ..runs.static import make_static_run
from ..runtime.device import resolve_precision
from ..runtime.dist import barrier, process_group
from ..settings import STATIC_IMPORTANCES, check_cut, check_r
from ..train.config import FinetuneConfig, FitGatesConfig
from ..train.loops import finetune, fit_gates
from .report import write_sweep_report

__all__ = ["SweepSettings", "Point", "run_sweep", "planned_points", "SWEEP_FILE", "SWEEP_FORMAT_VERSION", "KINDS"]

SWEEP_FILE = "sweep.json"
SWEEP_FORMAT_VERSION = 1
KINDS = ("dense", "control", "dynamic", "static")     # Point.kind


@dataclass
class SweepSettings:
    """What every point shares; a sweep folder holds one setting (re-running with other settings is refused)."""
    checkpoint: str
    checkpoint_sha256: str
    data: str
    attach: Dict[str, Any] = field(default_factory=dict)     # attach's keyword arguments (arch, input_size, ...)
    fit_gates: Dict[str, Any] = field(default_factory=dict)   # resolved FitGatesConfig (r and target_cut per point)
    finetune: Dict[str, Any] = field(default_factory=dict)    # resolved FinetuneConfig; epochs 0: no finetune
    val_split: Optional[float] = None
    train_samples: Optional[int] = None


@dataclass
class Point:
    kind: str                              # one of KINDS
    name: str                              # its run directory under the sweep folder
    r: Optional[float] = None              # dynamic: the rule's r (found from target_cut if given); static: its twin's
    target_cut: Optional[float] = None
    importance: Optional[str] = None       # static: Torch-Pruning importance
    twin: Optional[str] = None             # static: the dynamic point it matches
    status: str = "pending"                # pending | done | failed
    error: Optional[str] = None
    run: str = ""                          # the run directory, as given
    top1: Optional[float] = None
    top5: Optional[float] = None
    macs_mean: Optional[float] = None      # per sample, gates included
    dense_macs: Optional[float] = None     # the source model's
    oracle_macs: Optional[float] = None    # dynamic: oracle masks at r on the source, before any training
    oracle_top1: Optional[float] = None
    target_macs: Optional[float] = None    # static: what it was pruned to
    tp_macs: Optional[float] = None        # static: Torch-Pruning's count of its conv and linear layers
    latency_ms: Optional[float] = None     # with bench: median latency at batch 1 on this machine (``ftwt bench``)
    samples: Optional[int] = None          # validation images its top-1 is measured on
    seconds: float = 0.0

    @property
    def cut(self) -> Optional[float]:
        return None if self.macs_mean is None or not self.dense_macs else 1.0 - self.macs_mean / self.dense_macs


def _name(x: float) -> str:
    return f"{x:g}"


def planned_points(rs: Sequence[float], target_cuts: Sequence[float], static: Optional[str], dense_control: bool) -> List[Point]:
    pts = [Point("dense", "dense")]
    dyn = [Point("dynamic", f"dynamic-r{_name(r)}", r=r) for r in rs] + \
          [Point("dynamic", f"dynamic-cut{_name(c)}", target_cut=c) for c in target_cuts]
    for p in dyn:
        pts.append(p)
        if static:
            pts.append(Point("static", f"static-{static}-{p.name[len('dynamic-'):]}", importance=static, twin=p.name))
    if dense_control:
        pts.append(Point("control", "control"))
    return pts


def _read(out: Path) -> Optional[dict]:
    f = out / SWEEP_FILE
    if not f.is_file():
        return None
    try:
        doc = json.loads(f.read_text())
        if not isinstance(doc, dict) or doc.get("format") != "ftwt-sweep":
            raise ValueError("not a sweep file")
    except (OSError, ValueError) as e:
        raise FtwtError(f"{f} is damaged ({e})", "move it away to start the sweep over, or pass another --out") from None
    if int(doc.get("format_version", 0)) > SWEEP_FORMAT_VERSION:
        raise FtwtError(f"{f} was written by a newer ftwt", "upgrade ftwt")
    return doc


def _write(out: Path, settings: SweepSettings, points: List[Point]) -> None:
    doc = {"format": "ftwt-sweep", "format_version": SWEEP_FORMAT_VERSION, "ftwt_version": __version__,
           "settings": dataclasses.asdict(settings),
           "points": [{**dataclasses.asdict(p), "cut": p.cut} for p in points]}
    atomic_write_text(out / SWEEP_FILE, json.dumps(doc, indent=1))


def _point_from(d: Mapping) -> Point:
    names = {f.name for f in dataclasses.fields(Point)}
    return Point(**{k: v for k, v in d.items() if k in names})


def run_sweep(checkpoint: Path | str, data: str, out: Path | str, *, rs: Sequence[float] = (), target_cuts: Sequence[float] = (),
              static: Optional[str] = None, dense_control: bool = False, attach_options: Optional[Dict[str, Any]] = None,
              fit_cfg=None, finetune_cfg=None, val_split: Optional[float] = None, train_samples: Optional[int] = None,
              device: str = "auto", amp: str = "auto", on_event: Optional[Callable[[str], None]] = None,
              progress=None, bench: bool = False, check_source: bool = True) -> List[Point]:
    """Run (or continue) the sweep in ``out``; returns its points. ``fit_cfg`` / ``finetune_cfg``: resolved
    ``FitGatesConfig`` / ``FinetuneConfig`` shared by every point (their r / target cut set per point; finetune
    ``epochs`` 0 skips finetuning). ``bench``: also each point's median latency at batch 1 (``ftwt bench``: the
    compact path with the gates' decisions for dynamic points, the BN-folded network for the others), on rank 0.
    Under torchrun every process calls this; rank 0 alone writes. ``check_source``: stop when the source checkpoint
    scores near chance on the data (``eval.source``), before any point trains."""

    rs, target_cuts = [check_r(float(r)) for r in rs], [check_cut(float(c), "--target-cuts") for c in target_cuts]
    if not rs and not target_cuts:
        raise FtwtError("no dynamic point: --rs and --target-cuts are both empty", "pass e.g. --rs 0.95,0.9")
    if len(set(rs)) != len(rs) or len(set(target_cuts)) != len(target_cuts):
        raise FtwtError("--rs or --target-cuts lists a value twice", "list each value once")
    if static is not None and static not in STATIC_IMPORTANCES:
        raise FtwtError(f"unknown static importance '{static}'", f"use one of {', '.join(STATIC_IMPORTANCES)}")
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_file() and not checkpoint.is_dir():
        raise FtwtError(f"checkpoint not found: {checkpoint}", "pass the path of your checkpoint file")
    fit_cfg = fit_cfg or FitGatesConfig()
    finetune_cfg = finetune_cfg or FinetuneConfig()
    fit_cfg.validate()
    if finetune_cfg.epochs:
        finetune_cfg.validate()
    settings = SweepSettings(str(checkpoint), sha256_file(checkpoint) if checkpoint.is_file() else "", data,
                             dict(attach_options or {}), {k: v for k, v in dataclasses.asdict(fit_cfg).items() if k not in ("r", "target_cut")},
                             dataclasses.asdict(finetune_cfg), val_split, train_samples)
    emit = on_event or (lambda text: None)
    precision = resolve_precision(device, amp, None)
    with process_group(precision.device) as (d, _dev):
        prior = _read(out)
        if prior is not None:
            old = prior.get("settings", {})
            now = json.loads(json.dumps(dataclasses.asdict(settings)))
            diff = [k for k in now if old.get(k) != now[k]
                    and not (k == "checkpoint" and now["checkpoint_sha256"] and old.get("checkpoint_sha256") == now["checkpoint_sha256"])]
            if diff:
                raise FtwtError(f"{out} holds a sweep with other settings ({', '.join(diff)} differ)",
                                "re-run it with the same checkpoint, data and options, or pass another --out")
        elif out.exists() and any(out.iterdir()):
            raise FtwtError(f"{out} exists and holds no sweep", "pass a new or empty --out folder")
        # a sweep grows: earlier points stay in their order (finished ones as they are, unfinished ones listed again start
        # afresh from their run's state); new points follow in the order planned
        before = [_point_from(p) for p in (prior or {}).get("points", [])]
        planned = {p.name: p for p in planned_points(rs, target_cuts, static, dense_control)}
        listed = set(planned)
        points = [q if q.status == "done" or q.name not in planned else planned[q.name] for q in before] + \
                 [p for n, p in planned.items() if n not in {q.name for q in before}]
        barrier(d)                            # every process has read the folder before rank 0 writes to it
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
        barrier(d)
        with run_lock(out, "ftwt sweep") if d.main else nullcontext():
            ctx = _Ctx(checkpoint, data, out, settings, fit_cfg, finetune_cfg, device, amp, d, emit, progress, bench,
                       check_source)
            if d.main:
                _write(out, settings, points)
            first_error: Optional[FtwtError] = None
            for p in points:
                if p.status == "done" and bench and p.latency_ms is None and d.main:
                    ctx.bench(p)              # a finished point gets the latency column it lacks
                if p.status == "done" or p.name not in listed:
                    continue
                t0 = time.perf_counter()
                try:
                    ctx.run_point(p, {q.name: q for q in points})
                    p.status, p.error = "done", None
                except FtwtError as e:
                    p.status, p.error = "failed", str(e)
                    first_error = first_error or e
                    emit(f"{p.name}: failed: {e}")
                p.seconds += time.perf_counter() - t0
                if d.main:
                    _write(out, settings, points)
                barrier(d)
            if d.main:
                _write(out, settings, points)
                write_sweep_report(out, points)
        if first_error is not None:
            raise first_error
        return points


def _on_rank0(d, fn: Callable[[], Any]) -> None:
    """``fn`` on rank 0 alone (it writes), its failure shared: under torchrun every process raises the same one-line
    error, so that all of them move on to the next point together."""
    if not d.active:
        fn()
        return
    import torch.distributed as tdist
    msg: List[Any] = [None]
    if d.main:
        try:
            fn()
        except FtwtError as e:
            msg[0] = (e.message, e.hint)
    tdist.broadcast_object_list(msg, src=0)
    if msg[0] is not None:
        raise FtwtError(*msg[0])


class _Ctx:
    """What every point's steps need."""

    def __init__(self, checkpoint, data, out, settings, fit_cfg, ft_cfg, device, amp, d, emit, progress, bench=False,
                 check_source=True) -> None:
        self.checkpoint, self.data, self.out, self.settings = checkpoint, data, out, settings
        self.fit_cfg, self.ft_cfg, self.device, self.amp, self.d, self.emit = fit_cfg, ft_cfg, device, amp, d, emit
        self.progress, self.with_bench, self.check_source = progress, bench, check_source

    def bench(self, p: Point) -> None:
        """Median latency at batch 1 of the point's model on one validation image (``fast.timing.bench``)."""
        model = load(p.run)
        x, _ = next(iter(make_loader(open_data(self.data, model.meta.data_config, **self._split()).val, 1, train=False, workers=0)))
        rep = bench(model, x, warmup=5, reps=30)
        p.latency_ms = rep.row("compact" if p.kind == "dynamic" else "dense-folded").p50_ms

    def _attach(self, run: Path) -> None:
        """The source checkpoint as a new run (rank 0), unless the run is there already."""

        def make() -> None:
            if not is_run(run):
                self.emit(f"{run.name}: attach")
                attach(self.checkpoint, run_dir=run, **self.settings.attach)
                # every point attaches the same checkpoint: the dense point's measurement of it serves them all
                dense = self.out / "dense"
                if run != dense and is_run(dense) and read_meta(dense).source_eval is not None:
                    record_source_eval(run, read_meta(dense).source_eval)
        _on_rank0(self.d, make)

    def _epochs_done(self, run: Path, phase: str) -> int:
        t = read_meta(run).training.get(phase)
        return len(t.epochs) if t else 0

    def _train(self, run: Path, phase: str, epochs: int, call: Callable[[bool], Any]) -> None:
        """Run or resume one training phase of ``run`` until it has ``epochs`` epochs."""
        done = self._epochs_done(run, phase)
        if done >= epochs:
            return
        self.emit(f"{run.name}: {phase}" + (f" (resuming after epoch {done})" if done else ""))
        call(done > 0)

    def _evaluate(self, run: Path, gates: str, r: Optional[float] = None):
        return evaluate_run(run, self.data, gates=gates, r=r, batch_size=256, workers=self.fit_cfg.workers,
                            device=self.device, amp=self.amp, check_source=self.check_source)

    def _split(self) -> dict:
        return dict(val_split=self.settings.val_split, train_samples=self.settings.train_samples)

    def run_point(self, p: Point, by_name: Dict[str, Point]) -> None:
        run = self.out / p.name
        p.run = str(run)
        ft = self.ft_cfg
        if p.kind in ("dense", "control", "dynamic"):
            self._attach(run)
        if p.kind == "dynamic":
            if p.oracle_macs is None and p.r is not None:
                o = self._evaluate(run, "oracle", p.r)
                p.oracle_macs, p.oracle_top1 = o.macs_mean, o.top1
            cfg = dataclasses.replace(self.fit_cfg, r=p.r if p.r is not None else self.fit_cfg.r, target_cut=p.target_cut)
            self._train(run, "fit-gates", cfg.epochs, lambda resume: fit_gates(
                run, self.data, None if resume else cfg, resume=resume, device=self.device, amp=self.amp,
                progress=self.progress, check_source=self.check_source, **self._split()))
            p.r = read_meta(run).gating.r
            if p.oracle_macs is None:      # a target cut: the oracle estimate at the r found
                o = self._evaluate(run, "oracle", p.r)
                p.oracle_macs, p.oracle_top1 = o.macs_mean, o.top1
        if p.kind == "static":
            twin = by_name.get(p.twin)
            if twin is None or twin.status != "done" or twin.macs_mean is None:
                raise FtwtError(f"{p.name}: its dynamic twin {p.twin} did not finish", "fix the twin's error and re-run the sweep")
            p.r, p.target_macs = twin.r, twin.macs_mean
            if twin.macs_mean >= twin.dense_macs:
                raise FtwtError(f"{p.twin} cuts no MACs ({twin.macs_mean / 1e6:.2f} M per sample, gates included, against "
                                f"{twin.dense_macs / 1e6:.2f} M dense): there is nothing for a static twin to match",
                                "give the dynamic point a smaller r or more fit-gates epochs")
            self._static_run(run, p)
        if p.kind in ("control", "dynamic", "static") and ft.epochs:
            dense_control = p.kind != "dynamic"
            self._train(run, "finetune", ft.epochs, lambda resume: finetune(
                run, self.data, None if resume else ft, resume=resume, dense_control=dense_control, device=self.device,
                amp=self.amp, progress=self.progress, check_source=self.check_source, **self._split()))
        self.emit(f"{p.name}: evaluate")
        res = self._evaluate(run, "predict" if p.kind == "dynamic" else "open")
        p.top1, p.top5, p.macs_mean, p.samples = res.top1, res.top5, res.macs_mean, res.samples
        if self.with_bench and self.d.main:
            self.emit(f"{p.name}: bench")
            self.bench(p)
        p.dense_macs = by_name["dense"].dense_macs if p.kind != "dense" and by_name["dense"].dense_macs else res.dense_macs

    def _static_run(self, run: Path, p: Point) -> None:

        def make() -> None:
            if not is_run(run):
                self.emit(f"{run.name}: prune to {p.target_macs / 1e6:.2f} M MACs ({p.importance})")
                calib = self._calib_batch() if p.importance == "taylor" else None
                make_static_run(self.out / "dense", run, p.target_macs, p.importance, calib=calib)
        _on_rank0(self.d, make)
        s = read_meta(run).static
        p.tp_macs = s.tp_macs

    def _calib_batch(self) -> Tuple[Any, Any]:
        """A batch of training images (eval transform) with labels, for the Taylor importance's gradients."""
        meta = read_meta(self.out / "dense")
        splits = open_data(self.data, meta.data_config, num_classes=meta.arch.num_classes, **self._split())
        ds = splits.calibration(meta.data_config, min(self.fit_cfg.calib_samples, 256), self.fit_cfg.seed)
        xs, ys = zip(*make_loader(ds, 256, train=False, workers=0))
        import torch
        return torch.cat(xs), torch.cat(ys)
