"""File formats: checkpoints in, the run directory (typed metadata + safetensors, one commit per state, a write
lock), the exported file's metadata. Building models from them is ``runs``' job."""
from .meta import FORMAT_VERSION, RunMeta
from .rundir import META_FILE, commit, read_meta, run_lock, write_new_run

__all__ = ["RunMeta", "FORMAT_VERSION", "META_FILE", "read_meta", "commit", "run_lock", "write_new_run"]
