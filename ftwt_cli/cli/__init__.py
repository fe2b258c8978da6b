"""The ``ftwt`` command line: one module per command, each a thin wrapper over a library function."""
from ._app import app
from . import attach as _attach, evaluate as _evaluate, finetune as _finetune, fit_gates as _fit_gates  # noqa: F401  (register commands)

__all__ = ["app", "main"]


def main() -> None:
    app()
