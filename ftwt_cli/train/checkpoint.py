"""The training checkpoint (``checkpoint.pt`` in the run): what ``--resume`` continues from.

One ``torch.save`` dict, written with the run's weights and metadata as one commit (``io.rundir.commit``) at the end
of every epoch: the phase and its last finished epoch, the resolved config, the per-epoch history, the model's state,
each optimiser's (``opt_<name>``), the float16 loss scaler's, and any extra tensors of the phase (the distillation
teacher). Read back with ``weights_only=True``: no code is unpickled.
"""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

from ..errors import FtwtError

__all__ = ["checkpoint_bytes", "load_checkpoint", "resumed_config"]


def checkpoint_bytes(phase: str, epoch: int, cfg, history: List[Dict[str, Any]], model_state: Mapping[str, torch.Tensor],
                     optimizers: Mapping[str, Any], extra: Mapping[str, Any]) -> bytes:
    """The checkpoint as bytes (committed atomically by the caller). ``optimizers`` maps a name to an optimiser, or
    ``"scaler"`` to the GradScaler; None values (no gates, no scaler) are left out."""
    buf = io.BytesIO()
    scaler = optimizers.get("scaler")
    torch.save({"phase": phase, "epoch": epoch, "config": dataclasses.asdict(cfg), "history": history,
                "model": dict(model_state), **extra,
                **{f"opt_{k}": o.state_dict() for k, o in optimizers.items() if k != "scaler" and o is not None},
                **({"scaler": scaler.state_dict()} if scaler is not None else {})}, buf)
    return buf.getvalue()


def load_checkpoint(run_dir: Path, name: Optional[str], phase: str) -> Dict[str, Any]:
    """The run's training checkpoint of ``phase``; a missing, damaged or other phase's one is a user error."""
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


def resumed_config(cls: type, saved: Dict[str, Any], given):
    """The interrupted run's settings; a given setting that differs is refused, naming both values (a None field of
    ``given`` counts as not given)."""
    if given is None:
        return cls(**saved)
    for k, v in dataclasses.asdict(given).items():
        if v is not None and k in saved and v != saved[k]:
            raise FtwtError(f"{k.replace('_', '-')}={v!r} conflicts with the interrupted run's {k.replace('_', '-')}={saved[k]!r}",
                            "drop it to continue the run as it was, or start over without --resume")
    return cls(**saved)
