"""The run directory shared by every command (like git's .git): metadata JSON + weights as safetensors.

Every state of a run is one commit. ``ftwt.json`` is the pointer: it names the weights (and, once training has
run, the resumable checkpoint) it belongs to. A training epoch writes its new files under new names first and
replaces ``ftwt.json`` last (``os.replace``), so a crash at any point leaves the last complete epoch; files of an
unfinished commit, and temporary files, are removed by the next command that locks the run. A new run is built in a
temporary sibling folder and renamed into place; ``--force`` replaces only a folder that ftwt recognises as a run.

One writer at a time: commands that write a run hold an exclusive ``flock`` on ``RUN/.ftwt.lock``, which the kernel
releases when the process ends, so a crashed command never blocks the next. Files are created with the user's
umask.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, Mapping, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from ..errors import FtwtError
from .meta import RUN_FORMAT, RunMeta

__all__ = ["META_FILE", "WEIGHTS_FILE", "LOCK_FILE", "read_meta", "write_new_run", "commit", "run_lock", "is_run",
           "atomic_write_bytes", "atomic_write_text", "save_weights", "read_weights", "require_run", "check_writable", "inside",
           "record_source_eval"]

META_FILE = "ftwt.json"
WEIGHTS_FILE = "weights.safetensors"       # the weights of a run fresh from attach
LOCK_FILE = ".ftwt.lock"
_LEGACY_CHECKPOINT = "checkpoint.pt"       # ftwt 0.1.0's fixed name
# Names of what a commit writes (weights.TAG.safetensors, checkpoint.TAG.pt) and of temporary files: what the
# clean-up may remove when ftwt.json does not reference it.
_COMMIT_FILE = re.compile(r"^(weights(\.[\w-]+)?\.safetensors|checkpoint(\.[\w-]+)?\.pt)$")
_TMP_FILE = re.compile(r"^\..+\.tmp$")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mkstemp(path: Path) -> str:
    """A new temporary file beside ``path``, named as the clean-up recognises (``.NAME.XXXX.tmp``)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def _disk_error(path: Path, e: OSError) -> FtwtError:
    why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
    return FtwtError(f"cannot write {path} ({why})", "free space or choose a writable --run / --out")


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    """``write`` a temporary file beside ``path``, give it the umask's permissions, then move it into place: readers
    see the old file or the new one, never a part. A failed write leaves nothing behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _mkstemp(path)
    except OSError as e:
        raise _disk_error(path, e) from None
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())       # a writer may create its file afresh (safetensors does)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _disk_error(path, e) from None
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    _atomic(path, write)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_weights(path: Path, state_dict: Mapping[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """safetensors wants contiguous tensors that share no storage: write private copies, atomically."""
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state_dict.items()}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


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
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise FtwtError(f"{p} is damaged ({e})", "re-create the run with ftwt attach --force") from None
    meta = RunMeta.from_dict(d, str(p))
    if "files" not in d and (Path(run_dir) / _LEGACY_CHECKPOINT).is_file():     # a run written by ftwt 0.1.0
        meta.files.checkpoint = _LEGACY_CHECKPOINT
    return meta


def is_run(path: Path) -> bool:
    """Whether ``path`` is a folder ftwt wrote: its ftwt.json says it is an ftwt run."""
    try:
        return json.loads((Path(path) / META_FILE).read_text()).get("format") == RUN_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_writable(folder: Path) -> None:
    """Fail now, with one line, where writing into ``folder`` later would fail (read-only, no space for a small file)."""
    try:
        atomic_write_bytes(Path(folder) / ".ftwt-write-check.tmp", b"ok")     # a name the clean-up removes
        (Path(folder) / ".ftwt-write-check.tmp").unlink()
    except FtwtError:
        raise
    except OSError as e:
        raise _disk_error(Path(folder), e) from None


@contextlib.contextmanager
def run_lock(run_dir: Path, command: str = "ftwt") -> Iterator[None]:
    """Hold the run's write lock (refusing at once if another process holds it), then clean crash leftovers.
    The lock file exists only while held: it is removed, still locked, on release."""
    import fcntl  # POSIX advisory locks; imported where the lock is taken
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    except OSError as e:
        raise _disk_error(path, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(path).st_ino:   # the previous holder removed this file meanwhile
                raise OSError
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise FtwtError(f"{run_dir} is being written by another ftwt command ({holder})",
                            "wait for it to finish, or use another --run") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{command}, pid {os.getpid()}".encode(), 0)
        clean_leftovers(Path(run_dir))
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)        # releases the lock


def _referenced(run_dir: Path) -> set:
    """The file names ftwt.json points at (those of a 0.1.0 run when it names none)."""
    try:
        d = json.loads((run_dir / META_FILE).read_text())
        f = d["files"] if isinstance(d, dict) and "files" in d else {"weights": WEIGHTS_FILE, "checkpoint": _LEGACY_CHECKPOINT}
        return {v for v in (f.get("weights"), f.get("checkpoint")) if isinstance(v, str)}
    except (OSError, ValueError, AttributeError, KeyError):
        return {WEIGHTS_FILE, _LEGACY_CHECKPOINT}


def clean_leftovers(run_dir: Path) -> None:
    """Remove what an interrupted command left: temporary files, files of an unfinished commit, and the hidden
    sibling folders of an interrupted ``attach --force``. Only names that ftwt writes are touched."""
    run_dir = Path(run_dir)
    keep = _referenced(run_dir)
    for p in run_dir.iterdir():
        if p.is_file() and (_TMP_FILE.match(p.name) or (_COMMIT_FILE.match(p.name) and p.name not in keep)):
            p.unlink(missing_ok=True)
    _clean_siblings(run_dir)


def _clean_siblings(run_dir: Path) -> None:
    parent = run_dir.resolve().parent
    pattern = re.compile(rf"^\.{re.escape(run_dir.resolve().name)}\.\w+\.(tmp|old)$")
    now = time.time()
    for p in parent.iterdir():
        # a .tmp folder may be a new run still being built by a command running now: only old ones are leftovers
        if p.is_dir() and pattern.match(p.name) and (p.name.endswith(".old") or now - p.stat().st_mtime > 600) \
                and (is_run(p) or not any(p.iterdir()) or all(_TMP_FILE.match(q.name) or q.name in (META_FILE, WEIGHTS_FILE)
                                                             for q in p.iterdir())):
            shutil.rmtree(p, ignore_errors=True)


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies within it."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def write_new_run(run_dir: Path, meta: RunMeta, state_dict: Mapping[str, torch.Tensor], *, force: bool,
                  inputs: Sequence[Path] = ()) -> None:
    """Create ``run_dir`` in one step. An existing folder is replaced only with ``force`` and only if it is an ftwt
    run; the current folder, a folder holding it, and a run holding one of ``inputs`` are never replaced."""
    run_dir = Path(run_dir)
    check_replaceable(run_dir, force=force, inputs=inputs)
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}.", suffix=".tmp"))
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as e:
        raise _disk_error(run_dir, e) from None
    try:
        save_weights(tmp / WEIGHTS_FILE, state_dict)
        atomic_write_text(tmp / META_FILE, json.dumps(meta.to_dict(), indent=1))
        if run_dir.exists():
            with run_lock(run_dir, "ftwt attach --force"):
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


def check_replaceable(run_dir: Path, *, force: bool, inputs: Sequence[Path] = ()) -> None:
    """The checks ``write_new_run`` makes, for callers that want them before any slow work."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    if not force:
        raise FtwtError(f"{run_dir} already exists", "pass --force to replace it, or choose another --run")
    if inside(Path.cwd(), run_dir):
        raise FtwtError(f"--run {run_dir} is the current folder or holds it", "pass a subfolder, e.g. --run ftwt-run")
    if not is_run(run_dir):
        raise FtwtError(f"{run_dir} exists and is not an ftwt run; --force replaces only runs ftwt wrote",
                        "choose another --run, or move the folder away yourself")
    for p in inputs:
        if inside(p, run_dir):
            raise FtwtError(f"{p} lies inside the run {run_dir} that --force would replace",
                            "copy it out of the run first, or choose another --run")


def commit(run_dir: Path, meta: RunMeta, state_dict: Mapping[str, torch.Tensor], tag: str,
           checkpoint: Optional[bytes] = None) -> None:
    """Make (weights, checkpoint, metadata) the run's state in one step: the new files under names with ``tag``
    first, then ftwt.json pointing at them, then the files it no longer references. The caller holds the lock."""
    run_dir = require_run(run_dir)
    old = _referenced(run_dir)
    weights = f"weights.{tag}.safetensors"
    save_weights(run_dir / weights, state_dict)
    meta.files.weights = weights
    if checkpoint is not None:
        name = f"checkpoint.{tag}.pt"
        atomic_write_bytes(run_dir / name, checkpoint)
        meta.files.checkpoint = name
    atomic_write_text(run_dir / META_FILE, json.dumps(meta.to_dict(), indent=1))
    for name in old - {meta.files.weights, meta.files.checkpoint}:
        if _COMMIT_FILE.match(name):
            (run_dir / name).unlink(missing_ok=True)


def record_source_eval(run_dir: Path, source_eval) -> None:
    """Put the source checkpoint's measured accuracy (``meta.SourceEval``) into the run's ftwt.json, atomically, keeping
    everything else as it is. The caller holds the lock."""
    meta = read_meta(run_dir)
    meta.source_eval = source_eval
    atomic_write_text(run_dir / META_FILE, json.dumps(meta.to_dict(), indent=1))
