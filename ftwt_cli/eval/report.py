"""Render an EvalReport: report.json, report.md and PNG plots, written atomically into a folder."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Dict, List

from ..formats.rundir import atomic_write_bytes, atomic_write_text
from .run import EvalReport

__all__ = ["diagnostics", "write_report", "report_markdown", "changes", "REPORT_FILES", "PLOT_FILES", "fmt_macs", "ood_summary", "png_bytes"]

PLOT_FILES = ("keep_ratio.png", "macs_hist.png", "ood.png")
REPORT_FILES = ("report.json", "report.md", *PLOT_FILES)


def fmt_macs(x: float) -> str:
    """MACs for people: G above 100 M, else M."""
    return f"{x / 1e9:.3f} G" if x >= 1e8 else f"{x / 1e6:.2f} M"


def ood_summary(rep: EvalReport) -> List[Dict]:
    """Per shift, averaged over severities: accuracy gated vs open, MACs and keep ratio change vs clean."""
    out: Dict[str, Dict] = {}
    for s in rep.ood:
        d = out.setdefault(s.shift, {"shift": s.shift, "n": 0, "top1_gated": 0.0, "top1_open": 0.0, "macs": 0.0, "keep": 0.0})
        d["n"] += 1
        for k in ("top1_gated", "top1_open", "macs", "keep"):
            d[k] += getattr(s, k)
    rows = []
    for d in out.values():
        n = d.pop("n")
        for k in ("top1_gated", "top1_open", "macs", "keep"):
            d[k] /= n
        d["gated_minus_open"] = d["top1_gated"] - d["top1_open"]
        d["keep_change"] = d["keep"] - rep.clean_keep
        d["macs_change"] = d["macs"] / rep.macs_mean - 1 if rep.macs_mean else 0.0
        rows.append(d)
    return rows


def changes(rep: EvalReport) -> List[str]:
    """Each accuracy change as a labelled sentence: against the source checkpoint the user brought (when measured on
    this data), and from gating alone (against this run's own backbone with every gate open)."""
    out = []
    if rep.source_top1 is not None:
        out.append(f"against the source checkpoint ({rep.source_top1:.2%}): {(rep.top1 - rep.source_top1) * 100:+.2f} pt")
    if not rep.static:
        out.append(f"from gating alone (this run's backbone, gates open: {rep.top1_open:.2%}): "
                   f"{(rep.top1 - rep.top1_open) * 100:+.2f} pt")
    return out


def diagnostics(rep: EvalReport) -> List[str]:
    """Plain sentences on whether per-image choice pays (predicted gates only)."""
    out = []
    if rep.varying_share is not None:
        out.append(f"Decisions that vary per image: {rep.varying_share:.1%} of the gated channels fire on between 5% and "
                   f"95% of the images (the others are nearly always on or always off).")
    if rep.frozen_top1 is not None:
        d = (rep.top1 - rep.frozen_top1) * 100
        bn = (f"BatchNorm re-estimated under it on {rep.frozen_bn_images} training images" if rep.frozen_bn_images else
              "with the run's own BatchNorm statistics")
        out.append(f"The gates' majority decisions frozen into one static mask at {fmt_macs(rep.frozen_macs)} MACs (no "
                   f"gates; {bn}) score {rep.frozen_top1:.2%}: the per-image gates are {d:+.2f} pt against it"
                   + (" (per-image choice adds nothing here: a static mask does as well without the gates)." if d <= 0 else "."))
    if rep.ftwt_counter_macs is not None and rep.dense_macs:
        out.append(f"In FTWT's released counter (pre-add input sparsity credited, no gate cost, masked depthwise convs "
                   f"free) the same masks read {1 - rep.ftwt_counter_macs / rep.dense_macs:.1%} fewer MACs; the exact "
                   f"count above is {rep.reduction:.1%}.")
    return out


def report_markdown(rep: EvalReport) -> str:
    gap_clean = rep.top1 - rep.top1_open
    src1 = f"{rep.source_top1:.2%}" if rep.source_top1 is not None else "not measured on this data"
    src5 = f"{rep.source_top5:.2%}" if rep.source_top5 is not None else ""
    base_macs = rep.static_source_macs or rep.dense_macs
    if rep.static:
        lines = [
            f"# ftwt evaluation: {rep.arch} (statically pruned)", "",
            f"Run `{rep.run_dir}`, data {rep.data} (validation split, {rep.samples} images): a plain, smaller dense model.",
            "MACs are multiply-accumulates (which papers call FLOPs), per sample.", "",
            "| | this model | source checkpoint |", "|---|---|---|",
            f"| top-1 | {rep.top1:.2%} | {src1} |", f"| top-5 | {rep.top5:.2%} | {src5} |",
            f"| MACs per sample | {fmt_macs(rep.macs_mean)} | {fmt_macs(base_macs)} |",
            f"| reduction | **{rep.cut_vs_source:.1%}** | |", "",
        ]
        lines += [f"Accuracy change {c}." for c in changes(rep)]
        return "\n".join(lines) + "\n"
    lines = [
        f"# ftwt evaluation: {rep.arch}",
        "",
        f"Run `{rep.run_dir}`, data {rep.data} (validation split, {rep.samples} images), gates **{rep.gates}**"
        + (f" at r={rep.r}" if rep.r is not None else "") + ".",
        "MACs are multiply-accumulates (which papers call FLOPs), per sample, convs and linear layers only, gates included.",
        "*This run, gates open* is the run's own (possibly fine-tuned) backbone with every filter computed; *source "
        "checkpoint* is the model you attached, measured before any training.",
        "",
        "| | gated | this run, gates open | source checkpoint |",
        "|---|---|---|---|",
        f"| top-1 | {rep.top1:.2%} | {rep.top1_open:.2%} | {src1} |",
        f"| top-5 | {rep.top5:.2%} | {rep.top5_open:.2%} | {src5} |",
        f"| MACs per sample (mean) | {fmt_macs(rep.macs_mean)} | {fmt_macs(rep.dense_macs)} | {fmt_macs(rep.dense_macs)} |",
        f"| MACs p10 / p50 / p90 | {fmt_macs(rep.macs_p10)} / {fmt_macs(rep.macs_p50)} / {fmt_macs(rep.macs_p90)} | | |",
        f"| reduction | **{rep.reduction:.1%}** | | |",
        f"| gate overhead | {fmt_macs(rep.gate_macs)} ({rep.gate_macs / rep.dense_macs:.2%} of dense) | | |",
        f"| mean keep ratio (gated layers) | {rep.keep_mean:.1%} | 100% | 100% |",
        "",
        *[f"Accuracy change {c}." for c in changes(rep)],
        *([""] + diagnostics(rep) if diagnostics(rep) else []),
        "",
        "## Per layer",
        "",
        "| layer | keep mean | keep std | precision | recall |",
        "|---|---|---|---|---|",
    ]
    for l in rep.layers:
        pr = f"{l.precision:.2f}" if l.precision is not None else "–"
        rc = f"{l.recall:.2f}" if l.recall is not None else "–"
        lines.append(f"| {l.name} | {l.keep_mean:.1%} | {l.keep_std:.1%} | {pr} | {rc} |")
    if rep.ood:
        lines += ["", "## Out of distribution", "",
                  "Averaged over severities. *Δ* is gated minus open accuracy; on clean data it is "
                  f"{gap_clean * 100:+.2f} pt. MACs and keep-ratio changes are against clean data.", "",
                  "| shift | top-1 gated | top-1 open | Δ (pt) | MACs | MACs change | keep change (pt) |",
                  "|---|---|---|---|---|---|---|"]
        for d in ood_summary(rep):
            lines.append(f"| {d['shift']} | {d['top1_gated']:.2%} | {d['top1_open']:.2%} | {d['gated_minus_open'] * 100:+.2f} | "
                         f"{fmt_macs(d['macs'])} | {d['macs_change']:+.1%} | {d['keep_change'] * 100:+.1f} |")
        lines += ["", "| severity | top-1 gated | top-1 open | MACs |", "|---|---|---|---|"]
        for sev, g, o, m in _by_severity(rep):
            lines.append(f"| {sev} | {g:.2%} | {o:.2%} | {fmt_macs(m)} |")
    return "\n".join(lines) + "\n"


def _by_severity(rep: EvalReport):
    sevs = sorted({s.severity for s in rep.ood if s.severity > 0})
    out = []
    for sev in sevs:
        xs = [s for s in rep.ood if s.severity == sev]
        out.append((sev, sum(s.top1_gated for s in xs) / len(xs), sum(s.top1_open for s in xs) / len(xs),
                    sum(s.macs for s in xs) / len(xs)))
    return out


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt  # deferred: only plots need matplotlib, slow to import
    plt.close(fig)
    return buf.getvalue()


def _plots(rep: EvalReport) -> Dict[str, bytes]:
    import matplotlib  # deferred: only plots need matplotlib, slow to import
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: only plots need matplotlib, slow to import

    out = {}
    fig, ax = plt.subplots(figsize=(max(6, len(rep.layers) * 0.18), 3.5))
    xs = range(len(rep.layers))
    ax.bar(xs, [l.keep_mean for l in rep.layers], yerr=[l.keep_std for l in rep.layers], color="#4c72b0", ecolor="#999")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("kept filters (mean ± std)")
    ax.set_title(f"{rep.arch}: keep ratio per gated layer ({rep.gates} gates)")
    ax.set_xticks(list(xs), [l.name for l in rep.layers], rotation=90, fontsize=6)
    out["keep_ratio.png"] = png_bytes(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([m / 1e6 for m in rep.macs_per_sample], bins=40, color="#55a868")
    ax.axvline(rep.dense_macs / 1e6, color="k", ls="--", label="dense")
    ax.set_xlabel("MACs per sample (M)")
    ax.set_ylabel("samples")
    ax.legend()
    ax.set_title(f"per-sample MACs: mean {rep.reduction:.1%} below dense")
    out["macs_hist.png"] = png_bytes(fig)

    sev = _by_severity(rep)
    if sev:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        s = [0] + [x[0] for x in sev]
        a1.plot(s, [rep.top1] + [x[1] for x in sev], "o-", label="gated")
        a1.plot(s, [rep.top1_open] + [x[2] for x in sev], "s--", label="open (dense)")
        a1.set_xlabel("severity (0 = clean)")
        a1.set_ylabel("top-1")
        a1.legend()
        a2.plot(s, [rep.macs_mean / 1e6] + [x[3] / 1e6 for x in sev], "o-", color="#c44e52")
        a2.axhline(rep.dense_macs / 1e6, color="k", ls="--", label="dense")
        a2.set_xlabel("severity (0 = clean)")
        a2.set_ylabel("MACs per sample (M)")
        a2.legend()
        fig.suptitle("accuracy and compute under corruption (mean over corruptions)")
        out["ood.png"] = png_bytes(fig)
    return out


def write_report(rep: EvalReport, folder: Path) -> List[Path]:
    folder = Path(folder)
    written = []
    d = rep.to_dict()
    d["ood_summary"] = ood_summary(rep)
    atomic_write_text(folder / "report.json", json.dumps(d, indent=1))
    atomic_write_text(folder / "report.md", report_markdown(rep))
    written += [folder / "report.json", folder / "report.md"]
    plots = _plots(rep)
    for name, data in plots.items():
        atomic_write_bytes(folder / name, data)
        written.append(folder / name)
    for name in set(PLOT_FILES) - set(plots):       # an earlier report's plot that this one has not (ood.png)
        (folder / name).unlink(missing_ok=True)
    return written
