"""A run's (or an exported file's) latency: the model loaded, one batch of its data's validation images (or random
inputs), and ``fast.timing.bench`` on it. ``ftwt bench`` and the sweep's latency column both call ``bench_run``."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..arch.dataconfig import DataConfig
from ..arch.registry import ArchSpec, build_model
from ..arch.trace import trace_plan
from ..data import DataChoice, make_loader, open_data
from ..errors import FtwtError
from ..fast.clock import time_ms
from ..fast.fold import folded_backbone
from ..fast.timing import BenchReport, BenchRow, bench, oracle_masks
from ..gating.model import GatedModel, model_macs
from .loader import load

__all__ = ["bench_run"]


def bench_run(source: Path | str, *, batch_size: int = 1, input_size: Optional[Tuple[int, int, int]] = None,
              data: Optional[str] = None, choice: DataChoice = DataChoice(), r: Optional[float] = None,
              warmup: int = 10, reps: int = 50, threads: Optional[int] = None, check_gates: bool = True,
              onnx: Optional[Path | str] = None, with_source: bool = True) -> BenchReport:
    """Latency of ``source`` (a run directory or exported file) on ``batch_size`` validation images of ``data`` at
    ``input_size`` (default: the run's), or on random inputs when ``data`` is None. ``r`` replays oracle masks at that
    r instead of the gates' decisions (a model whose gates are not fitted needs it, unless ``check_gates`` is
    False: then only its dense rows mean anything, as for a sweep's dense point). ``onnx``: also time that ONNX file
    (``ftwt export --format onnx``) in onnxruntime on the same input, as the row "onnxruntime". ``with_source``: for a
    pruned model (a static twin or a hybrid), also the unpruned source architecture BN-folded, as the row
    "source-dense-folded" (random weights: a plain network's time does not depend on their values), so that its
    latency can be read against the model it replaces."""
    if batch_size < 1 or reps < 1:
        raise FtwtError("--batch-size and --reps must be at least 1", "e.g. --batch-size 1 --reps 50")
    model = load(source)
    dc = model.meta.data_config
    size = tuple(input_size or dc.input_size)
    if check_gates and model.units and model.meta.gating.mode != "predict" and r is None:
        raise FtwtError("the gates are not fitted yet", "run `ftwt fit-gates` first, or pass --r to replay oracle masks")
    if data is not None:
        cfg = DataConfig(size, dc.mean, dc.std, dc.interpolation, dc.crop_pct, dc.crop_mode)
        x, _ = next(iter(make_loader(open_data(data, cfg, choice=choice).val, batch_size, train=False, workers=0)))
    else:
        x = torch.randn(batch_size, *size)
    masks = oracle_masks(model, x, r) if r is not None else None
    rep = bench(model, x, masks=masks, warmup=warmup, reps=reps, threads=threads)
    if with_source and model.meta is not None and model.meta.static is not None:
        rep = dataclasses.replace(rep, rows=rep.rows + (_source_row(model, x, warmup, reps, rep.threads),))
    if onnx is None:
        return rep
    # what the ONNX graph computes: every filter (masks zero them, nothing is skipped), and every gate of a gated run
    gated_graph = bool(model.units) and model.meta.gating.mode == "predict"
    macs = rep.row("dense").macs + (model.gate_macs_dense() if gated_graph else 0)
    p50, p90 = onnx_latency(onnx, x, warmup=warmup, reps=reps, threads=rep.threads)
    return dataclasses.replace(rep, rows=rep.rows + (BenchRow("onnxruntime", p50, p90, macs),))


def _source_row(model: GatedModel, x: torch.Tensor, warmup: int, reps: int, threads: int) -> BenchRow:
    """The unpruned source architecture of a pruned run, every conv → norm pair folded, timed on ``x``."""
    a = model.meta.arch
    net = build_model(ArchSpec(a.source, a.name), a.num_classes, a.in_chans).eval()
    folded = folded_backbone(GatedModel(net, trace_plan(net, tuple(x.shape[1:])), []))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            p50, p90 = time_ms(lambda: folded(x), warmup, reps, x.device)
    finally:
        torch.set_num_threads(old)
    return BenchRow("source-dense-folded", p50, p90, model_macs(net, tuple(x.shape[1:])))    # at this input size


def onnx_latency(path: Path | str, x: torch.Tensor, *, warmup: int, reps: int, threads: int) -> Tuple[float, float]:
    """(p50, p90) ms of one onnxruntime run on ``x`` (CPU provider, ``threads`` intra-op threads)."""
    try:
        import onnxruntime as ort  # optional dependency: only --onnx needs it
    except ImportError:
        raise FtwtError("--onnx needs the onnxruntime package", "pip install 'ftwt[onnx]' (or: pip install onnxruntime)") from None
    path = Path(path)
    if not path.is_file():
        raise FtwtError(f"ONNX file not found: {path}", "write one with `ftwt export --format onnx --out FILE`")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise FtwtError(f"onnxruntime cannot load {path} ({str(e).splitlines()[0]})", "export it again with `ftwt export --format onnx`") from None
    feed = {sess.get_inputs()[0].name: x.numpy()}      # onnxruntime's Python API takes NumPy arrays (no copy: a view)
    return time_ms(lambda: sess.run(None, feed), warmup, reps)
