"""``ftwt evaluate`` as a function: the data (by default the run's), the run locked by rank 0 while it evaluates, and
the report files written into the run."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, List, Optional, Tuple

from ..formats.rundir import check_writable, read_meta, run_lock
from ..runs.defaults import default_data
from ..runtime.dist import launched_rank
from .report import write_report
from .run import EvalReport, evaluate_run

__all__ = ["evaluate_and_report"]


def evaluate_and_report(run_dir: Path | str, data: Optional[str] = None, **options: Any) -> Tuple[EvalReport, List[Path]]:
    """``evaluate_run(run_dir, data, **options)`` under the run's lock, then ``report.json``, ``.md`` and ``.png``
    written into the run; ``data`` None: the data the run was trained on. Under torchrun every process evaluates its
    shard; rank 0 alone locks and writes (the others get the report and no files)."""
    run_dir = Path(run_dir)
    read_meta(run_dir)                                  # a missing or damaged run fails before any slow work
    data = default_data(data, None, run_dir)
    main = launched_rank() == 0
    with run_lock(run_dir, "ftwt evaluate") if main else nullcontext():
        if main:
            check_writable(run_dir)
        rep = evaluate_run(run_dir, data, **options)
        return rep, (write_report(rep, run_dir) if main else [])
