"""Rendering a run: the terminal table, the markdown file and the JSON file.

One section per (suite, pass, dtype); in it one row per shape and implementation with
the median time and its interquartile spread, the throughput (GB/s for memory-bound
ops, TFLOP/s for attention, TOP/s for int8 GEMMs, tokens/s for models), the fraction of
the roofline measured in the same run (CUDA), the speed relative to PyTorch eager in
the same run (above 1: faster), and what the output check saw or why a row was skipped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .runner import Report, Result, summary_counts

UNITS = {"memory": "GB/s", "compute": "TFLOP/s", "int8": "TOP/s", None: "tokens/s"}


def fmt_time(seconds: float | None) -> str:
    """1.23 ms, 45.6 us, 789 ns, 2.50 s."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            v = seconds / scale
            return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _num(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"


def throughput(r: Result, bound: str | None) -> float | None:
    """The figure of merit of a result for its section's unit."""
    if r.tokens_per_s is not None:
        return r.tokens_per_s
    return r.gbps if bound == "memory" else r.tflops


def sections(results: Iterable[Result]) -> dict[tuple[str, str, str], list[Result]]:
    """Results grouped by (suite, pass, dtype), in run order."""
    out: dict[tuple[str, str, str], list[Result]] = {}
    for r in results:
        out.setdefault((r.suite, r.pass_, r.dtype), []).append(r)
    return out


def section_bound(rows: list[Result]) -> str | None:
    """'memory', 'compute', 'int8' or None (models: tokens/s): the unit of a section."""
    for r in rows:
        if r.bound != "?":
            return r.bound
    return "memory"


def _row_cells(r: Result, bound: str | None, show_shape: bool) -> list[str]:
    s = r.sample
    spread = "-" if s is None or not math.isfinite(s.spread) else f"{100 * s.spread:.1f}%"
    frac = "-" if r.fraction_of_roofline is None else f"{100 * r.fraction_of_roofline:.0f}%"
    vs = "-" if r.vs_eager is None else f"{r.vs_eager:.2f}x"
    if r.status == "ok":
        info = "; ".join(x for x in (r.check, r.note) if x)
    else:
        info = f"{r.status.upper()}: {r.reason}"
    mem = "" if r.peak_mem_bytes is None else f"{r.peak_mem_bytes / 2**20:.0f} MiB"
    return [
        r.shape_label if show_shape else "",
        r.impl,
        fmt_time(s.median_s if s else None),
        spread,
        _num(throughput(r, bound)),
        frac,
        vs,
        mem,
        info,
    ]


HEAD = ["shape", "implementation", "median", "IQR", "{unit}", "roofline", "vs eager", "peak mem", "check / note"]


def section_title(key: tuple[str, str, str], rows: list[Result]) -> str:
    suite, pass_, dtype = key
    return f"{suite} {pass_} {dtype} ({rows[0].device})"


def format_table(report: Report) -> str:
    """The terminal table of a run, with a header and a summary line."""
    lines = [_header_text(report), ""]
    for key, rows in sections(report.results).items():
        bound = section_bound(rows)
        head = [h.format(unit=UNITS[bound]) for h in HEAD]
        cells = []
        last = None
        for r in rows:
            cells.append(_row_cells(r, bound, r.shape_label != last))
            last = r.shape_label
        widths = [max(len(head[i]), *(len(c[i]) for c in cells)) for i in range(len(head) - 1)]
        lines.append(section_title(key, rows))
        lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=False)) + "  " + head[-1])
        for c in cells:
            lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(c, widths, strict=False)) + "  " + c[-1])
        lines.append("")
    lines.extend(_footer_lines(report))
    return "\n".join(lines)


def _header_text(report: Report) -> str:
    e = report.env
    dev = e["device_name"] + (f" ({e.get('capability')}, driver {e.get('driver')})" if e["device"] == "cuda" else "")
    lines = [
        f"llmkit bench on {dev}",
        f"torch {e['torch']}, CUDA {e['cuda'] or 'none'}, triton {e['triton'] or 'none'}, llmkit {e['llmkit']}, "
        f"commit {e['git_commit'] or 'unknown'}, {e['date']}",
        f"command: {e['command']}",
        f"shapes: {report.shapes_file} (version {report.shapes_version}), set {report.shape_set}",
    ]
    if report.roofline is not None:
        rf = report.roofline
        lines.append(
            f"roofline (measured now): copy {_num(rf.copy_gbps)} GB/s, bf16 matmul {_num(rf.bf16_tflops)} TFLOP/s, "
            f"int8 _int_mm {_num(rf.int8_tops)} TOP/s"
        )
    lines.extend(f"note: {n}" for n in report.notes)
    return "\n".join(lines)


def _footer_lines(report: Report) -> list[str]:
    c = summary_counts(report)
    out = [f"skipped: {s.what}: {s.reason}" for s in report.skipped]
    out.append(
        f"{c['ok']} measured, {c['skipped']} skipped, {c['error']} failed, {c['n/a']} not applicable"
        + (f", {c['skipped_requests']} requests skipped" if c["skipped_requests"] else "")
        + f" in {report.elapsed_s:.1f} s (exit code {report.exit_code})"
    )
    return out


def format_markdown(report: Report) -> str:
    """The markdown file of a run: the same tables as the terminal, with a header."""
    e = report.env
    lines = [f"# llmkit bench: {e['device_name']}", "", "| | |", "|---|---|"]
    for k in ("device_name", "driver", "cuda", "torch", "triton", "llmkit", "git_commit", "date", "command", "threads"):
        v = e.get(k)
        lines.append(f"| {k} | `{v}` |" if k == "command" else f"| {k} | {v} |")
    shapes = Path(report.shapes_file or "-").name
    lines.append(f"| shapes | {shapes} v{report.shapes_version}, set `{report.shape_set}` |")
    if report.roofline is not None:
        rf = report.roofline
        lines.append(
            f"| roofline | copy {_num(rf.copy_gbps)} GB/s, bf16 matmul {_num(rf.bf16_tflops)} TFLOP/s, "
            f"int8 {_num(rf.int8_tops)} TOP/s |"
        )
    lines.append("")
    lines.extend(f"- {n}" for n in report.notes)
    lines.append("")
    for key, rows in sections(report.results).items():
        bound = section_bound(rows)
        head = [h.format(unit=UNITS[bound]) for h in HEAD]
        lines.append(f"## {section_title(key, rows)}")
        lines.append("")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        last = None
        for r in rows:
            cells = _row_cells(r, bound, r.shape_label != last)
            last = r.shape_label
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    lines.extend(_footer_lines(report))
    lines.append("")
    return "\n".join(lines)


def _clean(x: Any) -> Any:
    """NaN and inf are not JSON: write them as null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def report_json(report: Report) -> dict[str, Any]:
    """The JSON document of a run (valid against :data:`llmkit.bench.schema.SCHEMA`)."""
    return _clean(report.to_json())


def write_json(report: Report, path: Path) -> None:
    """Write :func:`report_json` to ``path``."""
    path.write_text(json.dumps(report_json(report), indent=1, allow_nan=False) + "\n")
