"""The Typer app, the one rich Console, and the one place user errors become a message and exit code."""
from __future__ import annotations

import functools
from typing import Callable, NoReturn, TypeVar

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from ..errors import FtwtError

__all__ = ["app", "console", "err_console", "command", "EXIT_USER_ERROR"]

EXIT_USER_ERROR = 2
# rich switches to plain text by itself when stdout is not a terminal (pipes, CI logs).
console = Console()
err_console = Console(stderr=True)

# click's UsageError (bad flag, bad value, unknown command), found through typer's public BadParameter: typer may
# ship its own copy of click.
UsageError = typer.BadParameter.__mro__[1]


def _usage_error(e: Exception) -> NoReturn:
    """A bad flag or value (typer/click's own checks) as one line and exit 2, like every other user error."""
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else "ftwt"
    err_console.print(f"error: {e.format_message().rstrip('.')}. Fix: see `{where} --help`", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_USER_ERROR)


def _one_line_usage_errors(make_context):
    @functools.wraps(make_context)
    def wrapper(self, *args, **kwargs):
        try:
            return make_context(self, *args, **kwargs)
        except UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":    # bare `ftwt`: click prints the help itself
                raise
            _usage_error(e)
    return wrapper


class _Command(TyperCommand):
    make_context = _one_line_usage_errors(TyperCommand.make_context)


class _Group(TyperGroup):
    make_context = _one_line_usage_errors(TyperGroup.make_context)

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except UsageError as e:      # an unknown command
            _usage_error(e)


app = typer.Typer(name="ftwt", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, help="Dynamic pruning (Fire Together Wire Together) for timm/torchvision classifiers.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

F = TypeVar("F", bound=Callable)


def _one_line(text: str) -> str:
    """An FtwtError raised in a DataLoader worker comes back wrapped in the worker's traceback; keep its last
    line, which is the original message."""
    if "Original Traceback" in text:
        last = [l for l in text.strip().splitlines() if l.strip()][-1]
        return last.split("FtwtError: ", 1)[-1]
    return text


_INTERRUPTED = "interrupted: the run keeps its last completed epoch; `--resume` continues a training command from there"


def command(name: str, interrupted: str = _INTERRUPTED, **kw) -> Callable[[F], F]:
    """Register a Typer command whose FtwtError becomes one line on stderr and exit code 2; Ctrl-C prints
    ``interrupted`` (what the user can do next) and exits 130."""
    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except FtwtError as e:
                err_console.print(f"error: {_one_line(str(e))}", markup=False, highlight=False, soft_wrap=True)
                raise typer.Exit(EXIT_USER_ERROR)
            except KeyboardInterrupt:
                err_console.print(interrupted, markup=False, soft_wrap=True)
                raise typer.Exit(130)
        app.command(name, cls=_Command, **kw)(wrapper)
        return fn
    return deco


def _version(shown: bool) -> None:
    if shown:
        from .. import __version__
        console.print(f"ftwt {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """ftwt: make a classifier checkpoint cheaper to run by gating its filters and MLP units per input (FTWT, CVPR'22)."""
