"""``ftwt sweep``: dynamic points at several r (or MACs targets), their static twins at equal MACs, and the dense
control, each a run of its own, through the same library functions as the single commands."""
from .report import write_sweep_report
from .runner import SWEEP_FILE, Point, SweepSettings, run_sweep

__all__ = ["run_sweep", "SweepSettings", "Point", "SWEEP_FILE", "write_sweep_report"]
