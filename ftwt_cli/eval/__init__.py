"""Evaluation: accuracy and exact MACs over a loader, corruptions (OOD), reports and plots."""
from .evaluate import (
           EvalReport,
           EvalResult,
           LayerStat,
           ShiftResult,
           evaluate_loader,
           evaluate_run,
)
from .report import REPORT_FILES, write_report

__all__ = ["evaluate_loader", "evaluate_run", "EvalResult", "EvalReport", "LayerStat", "ShiftResult", "write_report",
           "REPORT_FILES"]
