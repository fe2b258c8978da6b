"""Files: checkpoints in, the run directory (typed metadata + safetensors, atomic writes), export and load."""
from .export import ExportReport, export
from .load import gated_from_meta, load
from .meta import FORMAT_VERSION, RunMeta
from .rundir import META_FILE, WEIGHTS_FILE, read_meta, update_run, write_new_run

__all__ = ["load", "gated_from_meta", "export", "ExportReport", "RunMeta", "FORMAT_VERSION", "META_FILE", "WEIGHTS_FILE",
           "read_meta", "update_run", "write_new_run"]
