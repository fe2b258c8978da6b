"""Write a generated results file whole and atomically (a temporary file, then a rename): the tables the benchmark
scripts produce live in ``benchmarks/results/``, apart from the hand-written readings that quote them."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_results"]


def write_results(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, path)
