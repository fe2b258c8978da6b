"""The one exception type for mistakes a user can make (bad file, bad flag, bad folder).

The CLI turns it into a single line plus a fix and a non-zero exit code; everything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

__all__ = ["FtwtError"]


class FtwtError(Exception):
    """A user-facing error: ``message`` names the bad value, ``hint`` says how to fix it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}. Fix: {self.hint}" if self.hint else self.message
