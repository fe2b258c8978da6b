"""The Typer app, the one rich Console, and the one place user errors become a message and exit code."""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import typer
from rich.console import Console

from ..errors import FtwtError
from ..runtime import keep_freed_memory

__all__ = ["app", "console", "err_console", "command", "EXIT_USER_ERROR"]

EXIT_USER_ERROR = 2

app = typer.Typer(name="ftwt", help="Dynamic channel pruning (Fire Together Wire Together) for timm/torchvision CNNs.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
# rich switches to plain text by itself when stdout is not a terminal (pipes, CI logs).
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable)


def _one_line(text: str) -> str:
    """An FtwtError raised in a DataLoader worker comes back wrapped in the worker's traceback; keep its last
    line, which is the original message."""
    if "Original Traceback" in text:
        last = [l for l in text.strip().splitlines() if l.strip()][-1]
        return last.split("FtwtError: ", 1)[-1]
    return text


def command(name: str, **kw) -> Callable[[F], F]:
    """Register a Typer command whose FtwtError becomes one line on stderr and exit code 2."""
    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except FtwtError as e:
                err_console.print(f"error: {_one_line(str(e))}", markup=False, highlight=False, soft_wrap=True)
                raise typer.Exit(EXIT_USER_ERROR)
            except KeyboardInterrupt:
                err_console.print("interrupted", markup=False)
                raise typer.Exit(130)
        app.command(name, **kw)(wrapper)
        return fn
    return deco


@app.callback()
def _root() -> None:
    """ftwt: make a CNN checkpoint cheaper to run by gating its filters per input (FTWT, CVPR'22)."""
    keep_freed_memory()       # the command owns the process: reuse freed activations instead of re-faulting them
