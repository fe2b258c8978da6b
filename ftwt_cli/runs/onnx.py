"""``ftwt export --format onnx``: a run as an ONNX graph that onnxruntime (or any ONNX runtime) executes.

* A static twin, or a run whose gates are open, is a plain dense network: its backbone is exported as it is.
* A gated run is exported with its gates in the graph: for every unit, the gate (global average pool → linear) runs
  on the unit's input and ``logits > 0`` becomes a 0/1 mask multiplied into the unit's output (a conv's channels after
  its norm; an MLP's hidden units; a gated MLP's fc2 input). The graph computes exactly what ``GatedModel`` computes
  in predict mode, but every filter is still computed and then zeroed: ONNX has no operator that skips a per-sample
  set of a convolution's filters, so the saving of the masks is not realised by the runtime (docs/export.md).

The export is the TorchScript-based ``torch.onnx.export`` tracer (dynamo=False), with a dynamic batch dim; the file
is written to a temporary name and renamed, so a failure leaves nothing behind.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..errors import FtwtError
from ..gating.gate import gate_key, pool
from ..gating.model import GatedModel
from .loader import load

__all__ = ["export_onnx", "OnnxReport", "onnx_module", "DEFAULT_OPSET"]

DEFAULT_OPSET = 17


@dataclass(frozen=True)
class OnnxReport:
    path: Path
    gated: bool                 # the gates are in the graph (else a plain dense network)
    opset: int
    bytes: int
    input_size: tuple


def onnx_module(model: GatedModel) -> nn.Module:
    """A copy of ``model``'s network that computes its predict-mode output with plain tensor ops (no recording): the
    module the exporter traces. A model without units, or with open gates, is its plain backbone."""
    net = model.plain_backbone()
    if not model.units or model.mode == "open":
        return net
    if model.mode != "predict":
        raise FtwtError(f"the gates are in {model.mode!r} mode, which an exported model cannot reproduce",
                        "export a run whose gates are fitted (`ftwt fit-gates`), or with open gates")
    masks: Dict[str, torch.Tensor] = {}
    gates = nn.ModuleDict({gate_key(u.name): model.gates[gate_key(u.name)] for u in model.units if not u.follows})
    net.ftwt_gates = gates                  # registered, so the gates' weights travel with the module
    get = net.get_submodule

    def gate_hook(name: str, tokens: bool):
        def hook(module, args):
            g = gates[gate_key(name)]
            masks[name] = (g.from_pooled(pool(args[0], tokens)) > 0)
        return hook

    def expand(mask: torch.Tensor, y: torch.Tensor, conv: bool) -> torch.Tensor:
        m = mask.to(y.dtype)
        return m[:, :, None, None] if conv else m.view(m.shape[0], *([1] * (y.dim() - 2)), m.shape[1])

    for u in model.units:
        conv = u.kind in ("conv", "stream")      # channels at dim 1 (a stream unit: a block's output)
        if u.follows:            # a depthwise follower: the mask of the unit it follows
            get(u.end).register_forward_hook(lambda module, args, out, f=u.follows: out * expand(masks[f], out, True))
            continue
        get(u.name).register_forward_pre_hook(gate_hook(u.name, not conv))
        if u.kind == "glu":      # the mask goes on fc2's input
            get(u.end).register_forward_pre_hook(
                lambda module, args, n=u.name: (args[0] * expand(masks[n], args[0], False), *args[1:]))
        else:
            get(u.end).register_forward_hook(lambda module, args, out, n=u.name, c=conv: out * expand(masks[n], out, c))
    return net.eval()


def export_onnx(source: Path | str, out: Path | str, *, opset: int = DEFAULT_OPSET, force: bool = False,
                input_size: Optional[tuple] = None) -> OnnxReport:
    """Write ``source`` (a run directory or an exported .safetensors file) as the ONNX file ``out``."""
    try:
        import onnx  # noqa: F401  (optional dependency: torch's exporter writes through it)
    except ImportError:
        raise FtwtError("--format onnx needs the onnx package", "pip install 'ftwt[onnx]' (or: pip install onnx onnxruntime)") from None
    out = Path(out)
    if out.suffix != ".onnx":
        raise FtwtError(f"--out {out} does not end in .onnx", f"pass e.g. --out {out.with_suffix('.onnx').name}")
    if not 7 <= opset <= 21:
        raise FtwtError(f"ONNX opset {opset} is not one the exporter writes", "pass --opset between 7 and 21 (default 17)")
    if out.exists() and not force:
        raise FtwtError(f"{out} exists", "pass --force to replace it, or another --out")
    model = load(source).eval()
    size = tuple(input_size or model.meta.data_config.input_size)
    net = onnx_module(model)
    x = torch.randn(2, *size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with warnings.catch_warnings():
            # the TorchScript exporter warns about itself (deprecated in favour of dynamo, which does not trace
            # forward hooks that close over a dict); we call it on purpose
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(net, (x,), str(tmp), input_names=["image"], output_names=["logits"], opset_version=opset,
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    except Exception as e:       # an operator the exporter lacks, a shape it cannot trace: one line, no file
        tmp.unlink(missing_ok=True)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FtwtError(f"{model.meta.arch} does not export to ONNX opset {opset} ({first})",
                        "try another --opset, or export the weights (`ftwt export`) and convert them with your own tooling") from None
    os.replace(tmp, out)
    return OnnxReport(out, bool(model.units) and model.mode == "predict", opset, out.stat().st_size, size)
