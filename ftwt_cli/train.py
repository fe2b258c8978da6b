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

Loss (FTWT eq. 2): L_pred = mean over layers l of Σ_f BCEWithLogits(P_f^l, g_f^l), averaged over the batch.

Both phases save a resumable checkpoint every epoch; shuffling and augmentation are seeded from
(seed, epoch), so ``resume`` continues exactly where a run stopped.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Tuple

import torch
import torch.nn.functional as F

from .config import FinetuneConfig, FitGatesConfig
from .data import DataSplits, default_workers, make_loader, open_data
from .errors import FtwtError
from .evaluate import EvalResult, evaluate_loader
from .gating import GatedModel, bool_to, gate_key
from .model_io import gated_from_meta
from .run import WEIGHTS_FILE, atomic_write_bytes, read_meta, read_weights, update_run

__all__ = ["fit_gates", "finetune", "EpochStats", "TrainReport", "Progress", "gate_loss", "gate_grads", "distill_loss", "CHECKPOINT_FILE"]

CHECKPOINT_FILE = "checkpoint.pt"


class Progress(Protocol):
    """What the loops report; the CLI draws it, tests may ignore it."""
    def start(self, phase: str, epoch: int, epochs: int, batches: int) -> None: ...
    def step(self, metrics: Dict[str, float]) -> None: ...
    def end(self, stats: "EpochStats") -> None: ...


class _Silent:
    def start(self, *a) -> None: ...
    def step(self, *a) -> None: ...
    def end(self, *a) -> None: ...


@dataclass(frozen=True)
class EpochStats:
    phase: str
    epoch: int                 # 1-based
    loss: float                # BCE (fit-gates) or CE + BCE (finetune), mean over batches
    bce: float
    ce: float
    agreement: float           # share of (sample, filter) decisions equal to the ground truth
    keep_ratio: float          # mean share of filters kept in gated layers (training batches)
    macs_cut: float            # 1 - mean MACs / dense MACs (training batches, gates included)
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


def gate_loss(model: GatedModel) -> torch.Tensor:
    """Σ over filters, mean over layers (and batch) of BCEWithLogits(gate logits, ground truth).

    Every (sample, filter) term carries the same weight 1/(B·L), so one BCE over all layers' logits side by
    side equals the per-layer sums averaged, in one kernel instead of one per layer."""
    sb = model.side_by_side()
    lg = sb.logits
    # float64 on CPU: more exact and ~2× faster there, since float32's log1p is not vectorised (measured).
    dt = torch.float64 if lg.device.type == "cpu" else lg.dtype
    bce = F.binary_cross_entropy_with_logits(lg.to(dt), sb.targets.to(dt), reduction="sum")
    return (bce / (sb.batch * len(sb.names))).to(lg.dtype)


_Z_MIN = -20.0     # gate_grads: below this signed logit, −log σ(z) = −z to float32 precision (e^z < 3e−9)


def _sum_log(p: torch.Tensor) -> torch.Tensor:
    """Σ log p over p in [σ(_Z_MIN), 1], as the log of products of four: a quarter of the logs, the costliest
    step of the loss on a CPU (measured: 257 against 138 µs for 128 × 3,904 gate decisions). Each product
    stays ≥ σ(−20)⁴ ≈ 2e−35, a normal float32, and rounds once per multiplication (~1e−7 relative), as the
    logs would."""
    v = p.reshape(-1)
    if v.numel() % 4:
        return v.log().sum()
    h = v.numel() // 2
    v = v[:h] * v[h:]
    return v[:h // 2].mul_(v[h // 2:]).log_().sum()


# Gates with fewer weights than this compute their weight gradient in float32 on any CPU: there MKL's float32 product
# beats the bfloat16 one with its two conversions (measured at batch 128: 12 against 29 µs for 64 × 64, 47 against
# 53 µs for 128 × 256; 256 × 256 and up: bf16 ahead, 72 against 88 µs).
_BF16_MIN_WEIGHTS = 128 * 256 + 1


@functools.lru_cache(maxsize=None)
def _native_bf16(device: torch.device) -> bool:
    """A CPU with native bf16 dot products (AVX512-BF16 or AMX), where oneDNN's bf16 products run ~3.5× faster
    than torch's float32 ones (measured: 17 ResNet-18 gates at batch 128, 0.61 against 2.13 ms)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _weight_grad_dtype(device: torch.device, weights: int) -> torch.dtype:
    """bfloat16 for the weight-gradient product of a gate with ``weights`` weights where that is faster (a large
    gate on a CPU with native bf16), else float32. The products accumulate in float32 inside oneDNN; rounding the
    gradient to bf16's 8-bit mantissa changes each Adam step by ~0.4% — the logits and the masks stay float32."""
    return torch.bfloat16 if weights >= _BF16_MIN_WEIGHTS and _native_bf16(device) else torch.float32


def gate_grads(model: GatedModel) -> torch.Tensor:
    """``gate_loss`` after a ``frozen_backbone`` forward, and its gradient for every gate, set in ``.grad``.

    fit-gates needs no autograd: with p = GAP(input) and logits l = W p + b, the loss's gradient is
    ∂L/∂l = (σ(l) − t) / (B·L) (the BCE-with-logits derivative), so ∂L/∂W = (∂L/∂l)ᵀ p and ∂L/∂b = Σ_batch ∂L/∂l.
    One sigmoid over all layers side by side, then one matrix product per gate: the graph bookkeeping that
    autograd would add costs more than this arithmetic on a CPU at batch 128 (measured).

    Both the loss and the gradient come from one sigmoid of the signed logit z = s·l, s = 2t − 1 = ±1:
    BCE = −log σ(z) and σ(l) − t = s·(σ(z) − 1), 4× cheaper on CPU than the float64 BCE kernel. Below
    z = −20 (a gate confidently wrong) σ(z) would underflow in ``_sum_log``'s products, so z is clamped there
    and the loss adds back the difference: −log σ(z) = −z + log(1 + e^z), and e^z < 3e−9 is nothing next to
    |z| in float32. The gradient is −s either way, to the same precision."""
    sb = model.side_by_side()
    lg = sb.logits
    scale = 1.0 / (sb.batch * len(sb.names))
    sign = bool_to(sb.targets, lg.dtype).mul_(2).sub_(1)
    z = lg * sign
    beyond = torch.zeros((), dtype=lg.dtype, device=lg.device)
    if float(z.amin()) < _Z_MIN:
        beyond = (_Z_MIN - z).clamp_min_(0).sum()
        z.clamp_min_(_Z_MIN)
    p = z.sigmoid_()
    loss = (beyond - _sum_log(p)).mul_(scale)
    grad = p.sub_(1).mul_(sign).mul_(scale)
    pooled = model.last_pooled
    fcs = [model.gates[gate_key(n)].fc for n in sb.names]
    wdts = [_weight_grad_dtype(lg.device, fc.weight.numel()) for fc in fcs]
    low = sb.blocks(grad.to(torch.bfloat16)) if torch.bfloat16 in wdts else None
    for i, (name, fc, wdt, gb, gl) in enumerate(zip(sb.names, fcs, wdts, sb.batch_sums(grad), sb.blocks(grad))):
        if wdt == gl.dtype:
            fc.weight.grad = gl.t() @ pooled[name]
        else:
            src = low[i] if wdt == torch.bfloat16 else gl.to(wdt)
            fc.weight.grad = (src.t() @ pooled[name].to(wdt)).to(fc.weight.dtype)
        fc.bias.grad = gb
    return loss


def _gate_optimizer(model: GatedModel, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam over the gates; the fused kernel updates all ~20 small gate tensors at once (3× faster on CPU)."""
    return torch.optim.Adam(model.gates.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


@functools.lru_cache(maxsize=16)
def _block_sizes(widths: Tuple[int, ...], batch: int) -> torch.Tensor:
    """(L,) float64 B·C_l: a layer's count of set entries over this is its mean."""
    return torch.tensor([batch * c for c in widths], dtype=torch.float64)


def _batch_metrics(model: GatedModel) -> Dict[str, float]:
    """Gate agreement with the ground truth and keep ratio (each a mean over layers), and the MACs cut."""
    s, t = model.last_stats, model.last_targets
    out = {"agreement": 1.0, "keep": 1.0, "macs_cut": 1.0 - float(s.macs.mean()) / s.dense_macs}
    if t:
        sb = model.side_by_side()
        masks = sb.masks if sb.masks is not None else torch.cat([s.masks[n].reshape(-1) for n in sb.names])
        size = _block_sizes(sb.widths, sb.batch)
        out["agreement"] = float((sb.layer_counts(masks == sb.targets).cpu() / size).mean())
        out["keep"] = float((sb.layer_counts(masks).cpu() / size).mean())
    return out


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temp: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), batch mean; T² keeps gradients comparable to CE's."""
    return F.kl_div(F.log_softmax(student / temp, 1), F.log_softmax(teacher / temp, 1), reduction="batchmean",
                    log_target=True) * temp * temp


def _teacher(ph: "_Phase") -> torch.nn.Module:
    """The frozen model finetune starts from (every gate open); saved in the checkpoint so resume uses the same."""
    from .compact import plain_copy
    teacher = plain_copy(ph.model.backbone)
    if ph.ck is not None:
        if "teacher" not in ph.ck:
            raise FtwtError(f"the checkpoint in {ph.run_dir} was written without --distill",
                            "resume without --distill, or run `ftwt finetune` again without --resume")
        teacher.load_state_dict(ph.ck["teacher"])
    for p in teacher.parameters():
        p.requires_grad_(False)
    ph.extra_state["teacher"] = teacher.state_dict()
    return teacher.eval()


def _save_checkpoint(run_dir: Path, payload: Dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(run_dir / CHECKPOINT_FILE, buf.getvalue())


def _load_checkpoint(run_dir: Path, phase: str) -> Dict[str, Any]:
    p = run_dir / CHECKPOINT_FILE
    if not p.is_file():
        raise FtwtError(f"nothing to resume in {run_dir}: no {CHECKPOINT_FILE}", f"run `ftwt {phase}` without --resume")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FtwtError(f"{p} is damaged ({str(e).splitlines()[0]})", f"run `ftwt {phase}` without --resume") from None
    if ck.get("phase") != phase:
        raise FtwtError(f"the checkpoint in {run_dir} is from `ftwt {ck.get('phase')}`, not `ftwt {phase}`",
                        f"resume with `ftwt {ck.get('phase')} --resume`, or run `ftwt {phase}` without --resume")
    return ck


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

    def __init__(self, phase: str, run_dir: Path, data: str, cfg, resume: bool, val_split: Optional[float],
                 train_samples: Optional[int] = None) -> None:
        self.phase, self.run_dir, self.cfg, self.data_arg = phase, Path(run_dir), cfg, str(data)
        self.meta = read_meta(self.run_dir)
        if resume:
            self.ck = _load_checkpoint(self.run_dir, phase)
            self.cfg = cfg = type(cfg)(**{**self.ck["config"], "epochs": cfg.epochs})   # same settings, maybe more epochs
            weights = self.ck["model"]
        else:
            self.ck = None
            weights = read_weights(self.run_dir / WEIGHTS_FILE)
            if cfg.workers is None:       # saved as resolved: resume must load with as many workers (augmentation)
                self.cfg = cfg = dataclasses.replace(cfg, workers=default_workers())
        self.model = gated_from_meta(self.meta, weights)
        from .archs import DataConfig
        self.data: DataSplits = open_data(data, DataConfig.from_dict(self.meta["data_config"]), val_split=val_split,
                                          num_classes=self.meta["arch"]["num_classes"], train_samples=train_samples)
        self.history: List[Dict[str, Any]] = list(self.ck["history"]) if self.ck else []
        self.extra_state: Dict[str, Any] = {}      # more tensors for the checkpoint (the distillation teacher)
        self.start_epoch = int(self.ck["epoch"]) if self.ck else 0

    def val_loader(self):
        return make_loader(self.data.val, self.cfg.batch_size, train=False, workers=self.cfg.workers)

    def finish_epoch(self, epoch: int, sums: Dict[str, float], batches: int, seconds: float, optimizers: Dict[str, Any],
                     progress: Progress) -> EpochStats:
        res = evaluate_loader(self.model, self.val_loader())
        avg = {k: v / max(batches, 1) for k, v in sums.items()}
        stats = EpochStats(self.phase, epoch, avg.get("loss", 0.0), avg.get("bce", 0.0), avg.get("ce", 0.0),
                           avg.get("agreement", 0.0), avg.get("keep", 1.0), avg.get("macs_cut", 0.0),
                           res.top1, res.reduction, seconds)
        self.history.append(dataclasses.asdict(stats))
        _save_checkpoint(self.run_dir, {
            "phase": self.phase, "epoch": epoch, "config": dataclasses.asdict(self.cfg), "history": self.history,
            "model": self.model.state_dict(), **self.extra_state,
            **{f"opt_{k}": o.state_dict() for k, o in optimizers.items()}})
        self.meta["gating"].update({"mode": "predict" if self.model.mode == "predict" else self.meta["gating"]["mode"],
                                    "r": self.model.r, "gt": self.model.gt, "decoupled": self.model.decoupled})
        self.meta.setdefault("training", {})[self.phase] = {"config": dataclasses.asdict(self.cfg), "data": self.data_arg,
                                                             "data_source": self.data.source, "epochs": self.history}
        self.meta["last_eval"] = {"phase": self.phase, "epoch": epoch, "top1": res.top1, "top5": res.top5,
                                  "macs": res.mean_macs, "dense_macs": res.dense_macs, "reduction": res.reduction,
                                  "data": self.data.source, "split": "val", "samples": res.samples}
        update_run(self.run_dir, self.meta, self.model.state_dict())
        progress.end(stats)
        self.last_eval = res
        return stats

    def report(self) -> TrainReport:
        if not hasattr(self, "last_eval"):   # nothing left to train (resumed a finished run): still report
            self.last_eval = evaluate_loader(self.model, self.val_loader())
        return TrainReport(self.run_dir, self.phase, [EpochStats(**h) for h in self.history], self.last_eval,
                           dataclasses.asdict(self.cfg))


def fit_gates(run_dir: Path | str, data: str, cfg: FitGatesConfig, *, resume: bool = False,
              val_split: Optional[float] = None, train_samples: Optional[int] = None,
              progress: Optional[Progress] = None) -> TrainReport:
    progress = progress or _Silent()
    cfg.validate()
    ph = _Phase("fit-gates", run_dir, data, cfg, resume, val_split, train_samples)
    cfg, model = ph.cfg, ph.model
    model.set_gates("predict", r=cfg.r, gt=cfg.gt)
    model.decoupled = True
    model.frozen_backbone = True           # no autograd graph: gate_grads gives the gates' gradients directly
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    opt = _gate_optimizer(model, cfg.lr, cfg.weight_decay)
    if ph.ck:
        opt.load_state_dict(ph.ck["opt_gates"])
    for epoch in range(ph.start_epoch + 1, cfg.epochs + 1):
        torch.manual_seed(cfg.seed * 1_000 + epoch)
        loader = make_loader(ph.data.train, cfg.batch_size, train=True, workers=cfg.workers, seed=cfg.seed, epoch=epoch)
        model.eval()                       # frozen backbone: running BN statistics stay as they are
        model.collect_targets = True
        progress.start(ph.phase, epoch, cfg.epochs, len(loader))
        sums: Dict[str, float] = {}
        t0 = time.perf_counter()
        for x, _ in loader:
            model(x)
            loss = gate_grads(model)       # the BCE, with its gradient already in each gate's .grad
            opt.step()
            m = {"loss": float(loss.detach()), "bce": float(loss.detach()), **_batch_metrics(model)}
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
            progress.step(m)
        model.collect_targets = False
        ph.finish_epoch(epoch, sums, len(loader), time.perf_counter() - t0, {"gates": opt}, progress)
    return ph.report()


def finetune(run_dir: Path | str, data: str, cfg: FinetuneConfig, *, resume: bool = False,
             val_split: Optional[float] = None, train_samples: Optional[int] = None, dense_control: bool = False,
             progress: Optional[Progress] = None) -> TrainReport:
    """``dense_control`` trains the backbone with every gate open and no gate loss: the same extra training,
    without gating, for a fair accuracy comparison."""
    progress = progress or _Silent()
    cfg.validate()
    ph = _Phase("finetune", run_dir, data, cfg, resume, val_split, train_samples)
    cfg, model = ph.cfg, ph.model
    g = ph.meta["gating"]
    if dense_control:
        model.set_gates("open")
    else:
        if g.get("mode") != "predict" and not ph.ck:
            raise FtwtError(f"the gates in {ph.run_dir} are not fitted yet", "run `ftwt fit-gates --data ...` first")
        model.set_gates("predict", r=cfg.r if cfg.r is not None else g.get("r") or 0.95, gt=cfg.gt or g.get("gt") or "mass")
    model.decoupled = cfg.mode == "decoupled"
    backbone_opt = torch.optim.SGD(model.backbone.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gate_opt = _gate_optimizer(model, cfg.gate_lr)
    if ph.ck:
        backbone_opt.load_state_dict(ph.ck["opt_backbone"])
        gate_opt.load_state_dict(ph.ck["opt_gates"])
    teacher = _teacher(ph) if cfg.distill > 0 else None
    steps_per_epoch = len(make_loader(ph.data.train, cfg.batch_size, train=True, workers=0))
    freeze_step = round(cfg.freeze_gates_at * cfg.epochs * steps_per_epoch)   # gates learn before this step
    for epoch in range(ph.start_epoch + 1, cfg.epochs + 1):
        torch.manual_seed(cfg.seed * 1_000 + epoch)
        loader = make_loader(ph.data.train, cfg.batch_size, train=True, workers=cfg.workers, seed=cfg.seed, epoch=epoch)
        model.train()
        model.collect_targets = not dense_control
        progress.start(ph.phase, epoch, cfg.epochs, len(loader))
        sums: Dict[str, float] = {}
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            step = (epoch - 1) * steps_per_epoch + i
            for group in backbone_opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(cfg, step, steps_per_epoch)
            out = model(x)
            ce = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
            task = ce
            if teacher is not None:
                with torch.no_grad():
                    t_out = teacher(x)
                task = (1.0 - cfg.distill) * ce + cfg.distill * distill_loss(out, t_out, cfg.distill_temp)
            bce = gate_loss(model) if not dense_control else torch.zeros(())
            gates_learn = not dense_control and step < freeze_step
            loss = task + cfg.bce_weight * bce if gates_learn else task
            backbone_opt.zero_grad(set_to_none=True)
            gate_opt.zero_grad(set_to_none=True)
            loss.backward()
            backbone_opt.step()
            if gates_learn:
                gate_opt.step()
            m = {"loss": float(loss.detach()), "ce": float(ce.detach()), "bce": float(bce.detach()),
                 **(_batch_metrics(model) if not dense_control else {"keep": 1.0, "macs_cut": 0.0, "agreement": 1.0})}
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
            progress.step(m)
        model.collect_targets = False
        ph.finish_epoch(epoch, sums, len(loader), time.perf_counter() - t0, {"backbone": backbone_opt, "gates": gate_opt}, progress)
    return ph.report()
