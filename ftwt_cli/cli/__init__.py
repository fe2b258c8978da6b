"""The ``ftwt`` command line: one module per command, each a thin wrapper over a library function."""
from . import attach, bench, demo, evaluate, export, finetune, fit_gates, info  # noqa: F401  (register the commands)
from .app import app

__all__ = ["app", "main"]


def main() -> None:
    app()
