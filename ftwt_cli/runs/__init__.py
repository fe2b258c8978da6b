"""Runs as models: a run directory or exported file rebuilt as a GatedModel (``loader``), exported (``exporter``), and a
static twin written as a run and loaded as a plain module (``static``)."""
from .exporter import ExportReport, export
from .loader import gated_from_meta, load
from .static import StaticRunReport, load_static, make_static_run

__all__ = ["load", "gated_from_meta", "export", "ExportReport", "make_static_run", "load_static", "StaticRunReport"]
