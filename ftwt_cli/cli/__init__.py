"""The ``ftwt`` command line: one module per command, each a thin wrapper over a library function."""
from ._app import app
from . import attach as _attach, fit_gates as _fit_gates, finetune as _finetune, evaluate as _evaluate, export as _export, bench as _bench  # noqa: F401  (register commands)

__all__ = ["app", "main"]


def main() -> None:
    app()
