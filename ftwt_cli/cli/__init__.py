"""The ``ftwt`` command line: one module per command, each a thin wrapper over a library function.

``main`` imports the commands itself, so that Ctrl-C while torch is still importing ends with one line too.
"""
from importlib import import_module
from typing import Any

__all__ = ["app", "main"]

_COMMANDS = ("attach", "fit_gates", "finetune", "hybrid", "evaluate", "sweep", "export", "info", "bench", "demo")


def _app():
    for name in _COMMANDS:           # each module registers its command on import
        import_module(f".{name}", __name__)
    return import_module(".application", __name__).app


def __getattr__(name: str) -> Any:
    if name == "app":
        return _app()
    raise AttributeError(f"module 'ftwt_cli.cli' has no attribute {name!r}")


def main() -> None:
    import sys
    try:
        app = _app()
    except KeyboardInterrupt:
        print("interrupted while starting; nothing was written", file=sys.stderr)
        sys.exit(130)
    app()
