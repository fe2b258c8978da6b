"""Run a sweep: one run directory per point under ``out``, resumable point by point.

Points, in order: the dense source model (evaluated as it is); for each r in ``rs`` and each target cut in
``target_cuts`` a dynamic point (attach → oracle estimate → fit-gates → finetune → evaluate) followed, with
``static``, by its static twin (Torch-Pruning prunes the source to the dynamic point's mean MACs → finetune with the
same budget and the dense-control loop → evaluate); with ``dense_control``, the source fine-tuned with the same
budget and every gate open; with ``hybrid`` (ε), after each dynamic point's fit-gates the hybrid of its fitted gates
(``runs.hybrid``), fine-tuned with the same budget, and its own static twin. ``sweep.json`` is rewritten after every
step: a re-run skips finished points and resumes an interrupted one from its run's own state (``--resume`` of the
training commands). A point that fails on bad input is recorded with its reason and the others still run; the first
such error is raised at the end.
"""
from __future__ import annotations

import dataclasses
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch.distributed as tdist

from ..attach import AttachOptions, attach
from ..data import open_data
from ..errors import FtwtError
from ..eval.budget import calibration_batches
from ..eval.run import evaluate_run
from ..formats.checkpoints import sha256_file
from ..formats.rundir import is_run, read_meta, record_source_eval, run_lock
from ..runs.bench import bench_run
from ..runs.hybrid import check_epsilon, make_hybrid_run
from ..runs.static import make_static_run
from ..runtime.dist import Dist, barrier
from ..runtime.session import session
from ..settings import STATIC_IMPORTANCES, check_cut, check_r
from ..static.prune import StaticOptions
from ..train.config import FinetuneConfig, FitGatesConfig
from ..train.loops import finetune, fit_gates
from .paired import pack
from .report import write_sweep_report
from .state import KINDS, SWEEP_FILE, Point, SweepSettings, planned_points, point_from, read_sweep, write_sweep

# the sweep's state types are re-exported: a caller of run_sweep reads its points
__all__ = ["run_sweep", "SweepSettings", "Point", "planned_points", "SWEEP_FILE", "KINDS"]


def run_sweep(checkpoint: Path | str, data: str, out: Path | str, *, rs: Sequence[float] = (), target_cuts: Sequence[float] = (),
              static: Optional[str] = None, dense_control: bool = False, attach_options: AttachOptions | Mapping[str, Any] | None = None,
              fit_cfg=None, finetune_cfg=None, val_split: Optional[float] = None, train_samples: Optional[int] = None,
              device: str = "auto", amp: str = "auto", on_event: Optional[Callable[[str], None]] = None,
              progress=None, bench: bool = False, check_source: bool = True,
              static_options: StaticOptions = StaticOptions(), hybrid: Optional[float] = None) -> List[Point]:
    """Run (or continue) the sweep in ``out``; returns its points. ``fit_cfg`` / ``finetune_cfg``: resolved
    ``FitGatesConfig`` / ``FinetuneConfig`` shared by every point (their r / target cut set per point; finetune
    ``epochs`` 0 skips finetuning). ``bench``: also each point's median latency at batch 1 (``ftwt bench``: the
    compact path with the gates' decisions for dynamic points, the BN-folded network for the others), on rank 0.
    ``attach_options``: how every point attaches the checkpoint (an ``AttachOptions``, or its ``to_dict()``).
    Under torchrun every process calls this; rank 0 alone writes. ``check_source``: stop when the source checkpoint
    scores near chance on the data (``eval.source``), before any point trains. ``static_options``: the static twins'
    Torch-Pruning settings beyond the importance (global and isomorphic pruning, rounding; ``static.prune``).
    ``hybrid``: ε of a hybrid point per dynamic point (``runs.hybrid``)."""

    rs, target_cuts = [check_r(float(r), "--rs") for r in rs], [check_cut(float(c), "--target-cuts") for c in target_cuts]
    if not rs and not target_cuts:
        raise FtwtError("no dynamic point: --rs and --target-cuts are both empty", "pass e.g. --rs 0.95,0.9")
    if len(set(rs)) != len(rs) or len(set(target_cuts)) != len(target_cuts):
        raise FtwtError("--rs or --target-cuts lists a value twice", "list each value once")
    if hybrid is not None:
        hybrid = check_epsilon(hybrid)
        residual = (attach_options.residual_stream if isinstance(attach_options, AttachOptions)
                    else bool((attach_options or {}).get("residual_stream")))
        if residual:
            raise FtwtError("--hybrid with --residual-stream: a hybrid of residual-stream units is not built",
                            "drop one of the two")
    if static is not None and static not in STATIC_IMPORTANCES:
        raise FtwtError(f"unknown static importance '{static}'", f"use one of {', '.join(STATIC_IMPORTANCES)}")
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_file() and not checkpoint.is_dir():
        raise FtwtError(f"checkpoint not found: {checkpoint}", "pass the path of your checkpoint file")
    static_options.validate()
    if static is None and static_options != StaticOptions():
        raise FtwtError("--static-global/--static-isomorphic/--static-round-to set how static twins are pruned, but no "
                        "static twin is asked for", "add --static l1 (or l2, taylor, fpgm)")
    fit_cfg = fit_cfg or FitGatesConfig()
    finetune_cfg = finetune_cfg or FinetuneConfig()
    fit_cfg.validate()
    if finetune_cfg.epochs:
        finetune_cfg.validate()
    if finetune_cfg.bce_weight is None and not finetune_cfg.task_aware:    # what finetune resolves it to (1), as
        finetune_cfg = dataclasses.replace(finetune_cfg, bce_weight=1.0)    # sweeps before task-aware gates saved it
    if finetune_cfg.target_cut is not None:
        raise FtwtError("finetune's target_cut is one budget, and a sweep has a point per cut: each task-aware dynamic "
                        "point takes its own --target-cuts value", "drop target_cut from the recipe's finetune section")
    options = attach_options if isinstance(attach_options, AttachOptions) else AttachOptions.from_dict(attach_options or {})
    settings = SweepSettings(str(checkpoint), sha256_file(checkpoint) if checkpoint.is_file() else "", data,
                             options.to_dict(), {k: v for k, v in dataclasses.asdict(fit_cfg).items() if k not in ("r", "target_cut")},
                             dataclasses.asdict(finetune_cfg), dataclasses.asdict(static_options), val_split, train_samples)
    emit = on_event or (lambda text: None)
    with session(device, amp) as sess:
        d = sess.dist
        prior = read_sweep(out)
        if prior is not None:
            old = dict(prior.get("settings", {}))
            try:                                  # attach options an older sweep.json lacks had their defaults
                old["attach"] = AttachOptions.from_dict(old.get("attach") or {}).to_dict()
            except (FtwtError, TypeError):
                pass
            if isinstance(old.get("finetune"), dict):   # and so had finetune settings added since
                old["finetune"] = {**dataclasses.asdict(FinetuneConfig()), **old["finetune"]}
            now = json.loads(json.dumps(dataclasses.asdict(settings)))
            defaults = dataclasses.asdict(SweepSettings("", "", ""))     # a key an older sweep.json lacks had its default
            diff = [k for k in now if old.get(k, defaults.get(k)) != now[k]
                    and not (k == "checkpoint" and now["checkpoint_sha256"] and old.get("checkpoint_sha256") == now["checkpoint_sha256"])]
            if diff:
                raise FtwtError(f"{out} holds a sweep with other settings ({', '.join(diff)} differ)",
                                "re-run it with the same checkpoint, data and options, or pass another --out")
        elif out.exists() and any(out.iterdir()):
            raise FtwtError(f"{out} exists and holds no sweep", "pass a new or empty --out folder")
        # a sweep grows: earlier points stay in their order (finished ones as they are, unfinished ones listed again start
        # afresh from their run's state); new points follow in the order planned
        before = [point_from(p) for p in (prior or {}).get("points", [])]
        planned = {p.name: p for p in planned_points(rs, target_cuts, static, dense_control, static_options.label, hybrid)}
        listed = set(planned)
        points = [q if q.status == "done" or q.name not in planned else planned[q.name] for q in before] + \
                 [p for n, p in planned.items() if n not in {q.name for q in before}]
        barrier(d)                            # every process has read the folder before rank 0 writes to it
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
        barrier(d)
        with run_lock(out, "ftwt sweep") if d.main else nullcontext():
            ctx = _Ctx(checkpoint=checkpoint, data=data, out=out, settings=settings, options=options, fit_cfg=fit_cfg,
                       ft_cfg=finetune_cfg, device=device, amp=amp, d=d, emit=emit, progress=progress, with_bench=bench,
                       check_source=check_source, static_options=static_options)
            if d.main:
                write_sweep(out, settings, points)
            first_error: Optional[FtwtError] = None
            for p in points:
                if p.status == "done" and bench and (p.latency_ms is None or p.latency32_ms is None) and d.main:
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
                    write_sweep(out, settings, points)
                barrier(d)
            if d.main:
                write_sweep(out, settings, points)
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
    msg: List[Any] = [None]
    if d.main:
        try:
            fn()
        except FtwtError as e:
            msg[0] = (e.message, e.hint)
    tdist.broadcast_object_list(msg, src=0)
    if msg[0] is not None:
        raise FtwtError(*msg[0])


@dataclass
class _Ctx:
    """What every point's steps need."""
    checkpoint: Path
    data: str
    out: Path
    settings: SweepSettings
    options: AttachOptions
    fit_cfg: FitGatesConfig
    ft_cfg: FinetuneConfig
    device: str
    amp: str
    d: Dist
    emit: Callable[[str], None]
    progress: Any = None
    with_bench: bool = False
    check_source: bool = True
    static_options: StaticOptions = StaticOptions()

    def bench(self, p: Point) -> None:
        """Median latency at batch 1 and 32 of the point's model on validation images (``runs.bench``): the compact
        path with the gates' decisions for a dynamic point, the BN-folded network for the others."""
        gated = self._gated(Path(p.run), p)
        row = "compact" if gated else "dense-folded"
        for batch, attr, reps in ((1, "latency_ms", 30), (32, "latency32_ms", 10)):
            rep = bench_run(p.run, batch_size=batch, data=self.data, choice=self.settings.choice, warmup=3, reps=reps,
                            check_gates=gated, with_source=False)   # the dense point is the sweep's source row
            setattr(p, attr, rep.row(row).p50_ms)

    def _attach(self, run: Path) -> None:
        """The source checkpoint as a new run (rank 0), unless the run is there already."""

        def make() -> None:
            if not is_run(run):
                self.emit(f"{run.name}: attach")
                attach(self.checkpoint, self.options, run_dir=run)
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
        """The training commands' --val-split and --train-samples."""
        return dataclasses.asdict(self.settings.choice)

    def run_point(self, p: Point, by_name: Dict[str, Point]) -> None:
        """The point's steps (``_STEPS`` by kind), then its evaluation (and latency)."""
        run = self.out / p.name
        p.run = str(run)
        for step in _STEPS[p.kind]:
            step(self, run, p, by_name)
        self.emit(f"{p.name}: evaluate")
        res = self._evaluate(run, "predict" if self._gated(run, p) else "open")
        p.top1, p.top5, p.macs_mean, p.samples = res.top1, res.top5, res.macs_mean, res.samples
        p.correct_bits = pack(res.correct)
        if self.with_bench and self.d.main:
            self.emit(f"{p.name}: bench")
            self.bench(p)
        p.dense_macs = by_name["dense"].dense_macs if p.kind != "dense" and by_name["dense"].dense_macs else res.dense_macs

    def _attach_step(self, run: Path, p: Point, by_name: Dict[str, Point]) -> None:
        self._attach(run)

    def _oracle(self, run: Path, p: Point) -> None:
        """The oracle estimate: the source's MACs and top-1 with oracle masks at the point's r, before training."""
        o = self._evaluate(run, "oracle", p.r)
        p.oracle_macs, p.oracle_top1 = o.macs_mean, o.top1

    def _fit_gates_step(self, run: Path, p: Point, by_name: Dict[str, Point]) -> None:
        if p.oracle_macs is None and p.r is not None:
            self._oracle(run, p)
        cfg = dataclasses.replace(self.fit_cfg, r=p.r if p.r is not None else self.fit_cfg.r, target_cut=p.target_cut)
        self._train(run, "fit-gates", cfg.epochs, lambda resume: fit_gates(
            run, self.data, None if resume else cfg, resume=resume, device=self.device, amp=self.amp,
            progress=self.progress, check_source=self.check_source, **self._split()))
        p.r = read_meta(run).gating.r
        if p.oracle_macs is None:      # a target cut: the oracle estimate at the r found
            self._oracle(run, p)

    def _gated(self, run: Path, p: Point) -> bool:
        """Whether the point's model has gates (a hybrid whose decisions never varied has none: it is static)."""
        return p.kind == "dynamic" or (p.kind == "hybrid" and bool(read_meta(run).gating.gated))

    def _hybrid_fork_step(self, run: Path, p: Point, by_name: Dict[str, Point]) -> None:
        """After a dynamic point's fit-gates (before its finetune): the hybrids of its fitted gates (rank 0)."""
        forks = [q for q in by_name.values() if q.kind == "hybrid" and q.twin == p.name and not is_run(self.out / q.name)]
        if not forks or self._epochs_done(run, "finetune"):
            return                 # made already, or the point was fine-tuned before a hybrid was asked for

        def make() -> None:
            for q in forks:
                self.emit(f"{q.name}: hybrid of {p.name}'s fitted gates (epsilon {q.epsilon:g})")
                make_hybrid_run(run, self.data, self.out / q.name, epsilon=q.epsilon, images=self.fit_cfg.calib_samples,
                                workers=self.fit_cfg.workers, choice=self.settings.choice)
        _on_rank0(self.d, make)

    def _hybrid_step(self, run: Path, p: Point, by_name: Dict[str, Point]) -> None:
        twin = by_name.get(p.twin)
        if twin is None or twin.status != "done" or not is_run(run):
            raise FtwtError(f"{p.name}: there is no hybrid of {p.twin}'s fitted gates ({p.twin} "
                            + ("did not finish" if twin is None or twin.status != "done" else "was fine-tuned before")
                            + ")", "fix the dynamic point's error, or run the sweep with --hybrid into a new --out")
        p.r = twin.r

    def _prune_step(self, run: Path, p: Point, by_name: Dict[str, Point]) -> None:
        twin = by_name.get(p.twin)
        if twin is None or twin.status != "done" or twin.macs_mean is None:
            raise FtwtError(f"{p.name}: its dynamic twin {p.twin} did not finish", "fix the twin's error and re-run the sweep")
        p.r, p.target_macs = twin.r, twin.macs_mean
        if twin.macs_mean >= twin.dense_macs:
            raise FtwtError(f"{p.twin} cuts no MACs ({twin.macs_mean / 1e6:.2f} M per sample, gates included, against "
                            f"{twin.dense_macs / 1e6:.2f} M dense): there is nothing for a static twin to match",
                            "give the dynamic point a smaller r or more fit-gates epochs")
        self._static_run(run, p)

    def _finetune_step(self, run: Path, p: Point, by_name: Dict[str, Point]) -> None:
        if not self.ft_cfg.epochs:
            return
        dense_control = not self._gated(run, p)   # the control and the static twins: every gate open
        cfg = self.ft_cfg
        if cfg.task_aware and p.kind == "dynamic" and p.target_cut is not None:
            cfg = dataclasses.replace(cfg, target_cut=p.target_cut)    # task-aware gates hold the point's cut
        self._train(run, "finetune", cfg.epochs, lambda resume: finetune(
            run, self.data, None if resume else cfg, resume=resume, dense_control=dense_control,
            device=self.device, amp=self.amp, progress=self.progress, check_source=self.check_source, **self._split()))

    def _static_run(self, run: Path, p: Point) -> None:

        def make() -> None:
            if not is_run(run):
                self.emit(f"{run.name}: prune to {p.target_macs / 1e6:.2f} M MACs ({p.importance})")
                calib = self._calib_batches() if p.importance == "taylor" else None
                make_static_run(self.out / "dense", run, p.target_macs, p.importance, calib=calib,
                                options=self.static_options)
        _on_rank0(self.d, make)
        s = read_meta(run).static
        p.tp_macs = s.tp_macs

    def _calib_batches(self) -> List[Tuple[Any, Any]]:
        """Training images (eval transform) with labels in batches of 32, for the Taylor importance's gradients:
        ``calib_samples`` of them (2048: 64 batches, as Torch-Pruning's examples accumulate ~50)."""
        meta = read_meta(self.out / "dense")
        splits = open_data(self.data, meta.data_config, num_classes=meta.arch.num_classes, choice=self.settings.choice)
        ds = splits.calibration(meta.data_config, self.fit_cfg.calib_samples, self.fit_cfg.seed)
        return calibration_batches(ds, 32, 0)


# What each kind of point does before its evaluation, in order (``Point.kind``; every kind of KINDS has a row).
_STEPS: Dict[str, Tuple[Callable[..., None], ...]] = {
    "dense": (_Ctx._attach_step,),
    "control": (_Ctx._attach_step, _Ctx._finetune_step),
    "dynamic": (_Ctx._attach_step, _Ctx._fit_gates_step, _Ctx._hybrid_fork_step, _Ctx._finetune_step),
    "hybrid": (_Ctx._hybrid_step, _Ctx._finetune_step),
    "static": (_Ctx._prune_step, _Ctx._finetune_step),
}
assert set(_STEPS) == set(KINDS)
