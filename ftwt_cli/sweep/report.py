"""A sweep's table (``sweep.md``) and plot (``pareto.png``): top-1 against mean MACs per sample for the dense model,
the dense control, the dynamic points (their oracle estimate drawn faintly), the hybrids and their static twins."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..eval.report import fmt_macs, png_bytes
from ..formats.rundir import atomic_write_bytes, atomic_write_text
from .paired import mcnemar, unpack, verdict

__all__ = ["write_sweep_report", "sweep_markdown", "pareto_front", "standard_error", "paired_test", "verdict_of", "SWEEP_FILES"]

SWEEP_FILES = ("sweep.md", "pareto.png")


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2%}"


def _ms(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}"


def pareto_front(points: Sequence) -> List:
    """The points no other point beats on both MACs (fewer) and top-1 (higher), by increasing MACs."""
    done = sorted((p for p in points if p.top1 is not None and p.macs_mean is not None), key=lambda p: (p.macs_mean, -p.top1))
    front, best = [], -1.0
    for p in done:
        if p.top1 > best:
            front.append(p)
            best = p.top1
    return front


def sweep_markdown(points: Sequence) -> str:
    by = {p.name: p for p in points}
    control = next((p for p in points if p.kind == "control" and p.status == "done"), None)
    dense = by.get("dense")
    bench = any(getattr(p, "latency_ms", None) is not None for p in points)
    lines = ["# Sweep", "",
             "Top-1 on the validation split; MACs are exact means per sample (gates included for dynamic points, the "
             "pruned network for static ones); cut is against the dense source model. *oracle*: the r rule's masks on "
             "the source model before any training.", "",
             "| point | kind | r | MACs | cut | top-1 | Δ vs control (pt) | oracle: MACs / top-1 |"
             + (" latency, batch 1 / 32 (ms) |" if bench else "") + " status |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if bench else "") + "---|"]
    for p in points:
        delta = "–" if control is None or p.top1 is None else f"{(p.top1 - control.top1) * 100:+.2f}"
        oracle = "–" if p.oracle_macs is None else f"{fmt_macs(p.oracle_macs)} / {_pct(p.oracle_top1)}"
        status = p.status if p.status != "failed" else f"failed: {p.error}"
        lines.append(f"| {p.name} | {p.kind} | {'–' if p.r is None else f'{p.r:g}'} | "
                     f"{'–' if p.macs_mean is None else fmt_macs(p.macs_mean)} | {_pct(p.cut)} | {_pct(p.top1)} | {delta} | "
                     f"{oracle} |" + (f" {_ms(p.latency_ms)} / {_ms(getattr(p, 'latency32_ms', None))} |" if bench else "")
                     + f" {status} |")
    pairs = [(by[p.twin], p) for p in points if p.kind == "static" and p.twin in by]
    pairs = [(d, s) for d, s in pairs if d.top1 is not None and s.top1 is not None]
    if pairs:
        lines += ["", "## Dynamic against static at equal MACs", "",
                  "McNemar's exact test on the same validation images: *only dyn.* and *only stat.* count the images "
                  "one of the two gets right and the other wrong.", "",
                  "| gated point | static importance | MACs gated / static | top-1 gated | top-1 static | Δ dynamic − static (pt) | only dyn. / only stat. | p |",
                  "|---|---|---|---|---|---|---|---|"]
        for d, s in pairs:
            b, c, p = paired_test(d, s)
            lines.append(f"| {d.name} | {s.importance} | {fmt_macs(d.macs_mean)} / {fmt_macs(s.macs_mean)} | {_pct(d.top1)} | {_pct(s.top1)} | "
                         f"{(d.top1 - s.top1) * 100:+.2f} | {'–' if p is None else f'{b} / {c}'} | {'–' if p is None else f'{p:.3g}'} |")
        lines += ["", "What to use:", ""] + [f"- {d.name}: {verdict_of(d, s)}." for d, s in pairs]
    if dense is not None and dense.top1 is not None:
        lines += ["", f"Dense source model: top-1 {_pct(dense.top1)} at {fmt_macs(dense.macs_mean)}."]
    n = next((p.samples for p in points if getattr(p, "samples", None)), None)
    ref = dense.top1 if dense is not None and dense.top1 is not None else next((p.top1 for p in points if p.top1), None)
    if n and ref is not None:
        lines += ["", f"Validation split: {n} images. The standard error of one top-1 near {ref:.1%} is "
                      f"{standard_error(ref, n) * 100:.2f} pt, so a gap between two points under about twice that "
                      "({:.2f} pt) is within noise; one seed per point.".format(2 * standard_error(ref, n) * 100)]
    return "\n".join(lines) + "\n"


def paired_test(d, s) -> Tuple[Optional[int], Optional[int], Optional[float]]:
    """McNemar between a dynamic point and its static twin, when both stored their per-image results."""
    if not (getattr(d, "correct_bits", None) and getattr(s, "correct_bits", None)) or d.samples != s.samples:
        return None, None, None
    return mcnemar(unpack(d.correct_bits, d.samples), unpack(s.correct_bits, s.samples))


def verdict_of(d, s) -> str:
    """The plain sentence for a dynamic (or hybrid) point and its static twin."""
    return verdict(d.top1, s.top1, paired_test(d, s)[2], d.cut, s.importance,
                   model="hybrid model" if getattr(d, "kind", "dynamic") == "hybrid" else "dynamic model")


def standard_error(top1: float, samples: int) -> float:
    """The binomial standard error of a top-1 measured on ``samples`` images: sqrt(p(1 − p)/n)."""
    return (top1 * (1 - top1) / max(samples, 1)) ** 0.5


def _plot(points: Sequence) -> bytes:
    import matplotlib  # deferred: only plots need matplotlib, slow to import
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: only plots need matplotlib, slow to import
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    series = [("dynamic (FTWT)", [p for p in points if p.kind == "dynamic"], dict(color="tab:blue", marker="o")),
              ("hybrid", [p for p in points if p.kind == "hybrid"], dict(color="tab:cyan", marker="h"))]
    colours, markers = ("tab:orange", "tab:red", "tab:purple", "tab:brown"), ("s", "^", "v", "P")
    for i, imp in enumerate(sorted({p.importance for p in points if p.kind == "static"})):
        series.append((f"static (Torch-Pruning, {imp})", [p for p in points if p.kind == "static" and p.importance == imp],
                       dict(color=colours[i % 4], marker=markers[i % 4])))
    for label, pts, st in series:
        pts = sorted((p for p in pts if p.top1 is not None), key=lambda p: p.macs_mean)
        if pts:
            ax.plot([p.macs_mean / 1e6 for p in pts], [p.top1 * 100 for p in pts], linestyle="-", label=label, **st)
    oracle = sorted((p for p in points if p.kind == "dynamic" and p.oracle_macs is not None), key=lambda p: p.oracle_macs)
    if oracle:
        ax.plot([p.oracle_macs / 1e6 for p in oracle], [p.oracle_top1 * 100 for p in oracle], color="tab:blue", alpha=0.3,
                marker="o", markerfacecolor="none", linestyle="--", label="oracle estimate (before training; may lie below)")
    for kind, st in {"dense": dict(color="black", marker="*", markersize=12, label="dense source"),
                     "control": dict(color="tab:green", marker="D", label="dense control")}.items():
        for p in points:
            if p.kind == kind and p.top1 is not None:
                ax.plot([p.macs_mean / 1e6], [p.top1 * 100], linestyle="none", **st)
    # the y-range of the trained points (the comparison the plot is for); the faint oracle line, often far below, is
    # clipped rather than allowed to squeeze them into a thin band
    real = [p.top1 * 100 for p in points if p.top1 is not None]
    if real:
        lo, hi = min(real), max(real)
        pad = max(0.5, 0.15 * (hi - lo))
        ax.set_ylim(lo - pad, min(100.0, hi + pad))
    ax.set_xlabel("MACs per sample (M)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def write_sweep_report(out: Path, points: Sequence) -> List[Path]:
    """``sweep.md`` and ``pareto.png`` in ``out`` (atomically)."""
    out = Path(out)
    atomic_write_text(out / "sweep.md", sweep_markdown(points))
    files = [out / "sweep.md"]
    if any(p.top1 is not None for p in points):
        atomic_write_bytes(out / "pareto.png", _plot(points))
        files.append(out / "pareto.png")
    return files
