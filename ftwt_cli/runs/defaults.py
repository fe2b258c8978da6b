"""What a command takes when ``--data`` is left out: the recipe's ``data``, else the data the run was last trained on."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import FtwtError
from ..formats.rundir import is_run, read_meta

__all__ = ["default_data"]


def default_data(data: Optional[str], recipe: Optional[dict] = None, run: Optional[Path] = None) -> str:
    """``data``, else the recipe's ``data`` key, else the data ``run`` was last trained on; one of them is needed."""
    chosen = data or (recipe or {}).get("data")
    if not chosen and run is not None and is_run(Path(run)):
        chosen = read_meta(Path(run)).trained_data()
    if not chosen:
        raise FtwtError("no --data given" + (" and the recipe names none" if recipe else "")
                        + (" and the run was never trained on any" if run is not None else ""),
                        "pass --data DIR (or fashion-mnist, digits), or a recipe with a `data:` key")
    if not isinstance(chosen, str):
        raise FtwtError(f"the recipe's data={chosen!r} must be a string", "e.g. data: fashion-mnist")
    return chosen
