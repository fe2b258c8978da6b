"""Files: checkpoints in, the run directory (typed metadata + safetensors, one commit per state, a write lock),
export and load."""
from .export import ExportReport, export
from .load import gated_from_meta, load
from .meta import FORMAT_VERSION, RunMeta
from .rundir import META_FILE, commit, read_meta, run_lock, write_new_run

__all__ = ["load", "gated_from_meta", "export", "ExportReport", "RunMeta", "FORMAT_VERSION", "META_FILE", "read_meta",
           "commit", "run_lock", "write_new_run"]
