"""The run directory shared by every command (like git's .git): metadata JSON + weights as safetensors.

Writes are atomic: a new run is built in a temporary sibling folder and renamed into place; an update
replaces each file with ``os.replace`` after writing it in full. A crash never leaves a half-written run.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch
from safetensors.torch import load_file, save_file

from ..errors import FtwtError
from .meta import RunMeta

__all__ = ["META_FILE", "WEIGHTS_FILE", "read_meta", "write_new_run", "update_run",
           "atomic_write_bytes", "atomic_write_text", "save_weights", "read_weights", "require_run"]

META_FILE = "ftwt.json"
WEIGHTS_FILE = "weights.safetensors"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_weights(path: Path, state_dict: Mapping[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """safetensors wants contiguous tensors that share no storage: write private copies, atomically."""
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state_dict.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_weights(path: Path) -> Dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises several types for a damaged file
        raise FtwtError(f"cannot read {path} ({e})", "re-create the run with ftwt attach --force") from None


def require_run(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / META_FILE).is_file():
        raise FtwtError(f"no ftwt run at {run_dir}", "create one with `ftwt attach CHECKPOINT --run DIR`, or pass --run")
    return run_dir


def read_meta(run_dir: Path) -> RunMeta:
    p = require_run(run_dir) / META_FILE
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FtwtError(f"{p} is damaged ({e})", "re-create the run with ftwt attach --force") from None
    return RunMeta.from_dict(d, str(p))


def write_new_run(run_dir: Path, meta: RunMeta, state_dict: Mapping[str, torch.Tensor], *, force: bool) -> None:
    """Create ``run_dir`` in one step; an existing run is replaced only with ``force``."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not force:
        raise FtwtError(f"{run_dir} already exists", "pass --force to replace it, or choose another --run")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}.", suffix=".tmp"))
    try:
        save_weights(tmp / WEIGHTS_FILE, state_dict)
        atomic_write_text(tmp / META_FILE, json.dumps(meta.to_dict(), indent=1))
        if run_dir.exists():
            old = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}.", suffix=".old"))
            old.rmdir()
            run_dir.rename(old)
            tmp.rename(run_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def update_run(run_dir: Path, meta: RunMeta, state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Replace a run's weights (if given) and then its metadata, each atomically."""
    run_dir = require_run(run_dir)
    if state_dict is not None:
        save_weights(run_dir / WEIGHTS_FILE, state_dict)
    atomic_write_text(run_dir / META_FILE, json.dumps(meta.to_dict(), indent=1))
