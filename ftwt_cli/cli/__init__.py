"""The ``ftwt`` command line: one module per command, each a thin wrapper over a library function."""
from ._app import app
from . import attach as _attach  # noqa: F401  (registers the command)

__all__ = ["app", "main"]


def main() -> None:
    app()
