"""PNG plots of a run through matplotlib (the ``bench`` extra), imported lazily.

One PNG per (suite, pass, dtype): throughput (or time, where a case has no throughput)
against the suite's size axis, one line per implementation, one panel per group of
points that differ only in that size (e.g. attention: head dim x causal), and the
roofline measured in the same run drawn as a dashed horizontal line where it applies.
Without matplotlib no PNG is written and :func:`write_plots` says so.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from .report import UNITS, section_bound, sections, throughput
from .runner import Report, Result


def matplotlib_missing() -> str | None:
    """None when matplotlib can be imported, else the reason there will be no PNG."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (pip install 'llmkit[bench]'): no PNG plots"
    return None


def _series(rows: list[Result], bound: str | None) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """group -> implementation -> [(x, y)] for the measured rows."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in rows:
        if r.status != "ok" or r.x is None or r.sample is None:
            continue
        y = throughput(r, bound)
        if y is None:
            y = r.sample.median_s * 1e3
        out.setdefault(r.group, {}).setdefault(r.impl, []).append((float(r.x), y))
    return out


def write_plots(report: Report, folder: Path) -> tuple[list[Path], str | None]:
    """Write the PNGs into ``folder``; returns (files written, why none were, or None)."""
    why = matplotlib_missing()
    if why:
        return [], why
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for (suite, pass_, dtype), rows in sections(report.results).items():
        bound = section_bound(rows)
        series = _series(rows, bound)
        if not series:
            continue
        has_metric = any(throughput(r, bound) is not None for r in rows if r.status == "ok")
        ylabel = UNITS[bound] if has_metric else "median time (ms)"
        roof = None
        if report.roofline is not None and has_metric and bound is not None:
            kind = next((r.roofline for r in rows if r.roofline), None)
            roof = report.roofline.roof(kind) if kind else None
        n = len(series)
        cols = min(n, 2)
        nrows = math.ceil(n / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(6.4 * cols, 4.2 * nrows), squeeze=False)
        for ax, (group, impls) in zip(axes.flat, series.items(), strict=False):
            xs_all: list[float] = []
            for impl, pts in impls.items():
                pts.sort()
                xs, ys = zip(*pts, strict=True)
                xs_all += xs
                ax.plot(xs, ys, marker="o", label=impl)
            if roof is not None:
                ax.axhline(roof, linestyle="--", color="black", linewidth=1, label=f"roofline {roof:.3g} {ylabel}")
            if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 8:
                ax.set_xscale("log", base=2)
            ax.set_xlabel(rows[0].x_name or "size")
            ax.set_ylabel(ylabel)
            ax.set_title(group, fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        fig.suptitle(f"{suite} {pass_} {dtype} on {report.env['device_name']}", fontsize=10)
        fig.tight_layout()
        path = folder / f"{suite}-{pass_}-{dtype}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written, None
