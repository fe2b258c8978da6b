"""Evaluation: accuracy and exact MACs over a loader, corruptions (OOD), reports and plots."""
from .evaluate import EvalResult, evaluate_loader
from .report import REPORT_FILES, write_report
from .run import EvalReport, LayerStat, ShiftResult, evaluate_run

__all__ = ["evaluate_loader", "evaluate_run", "EvalResult", "EvalReport", "LayerStat", "ShiftResult", "write_report",
           "REPORT_FILES"]
