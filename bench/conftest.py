"""pytest-benchmark suites for llmkit's CPU paths: ``pytest bench/``.

The cases are those of ``llmkit bench`` (same builders in :mod:`llmkit.bench`, same
shapes from ``bench/shapes.json``), one pytest-benchmark test per implementation, grouped
by case so pytest-benchmark's table compares the implementations of one case side by
side. Every implementation's output is checked against PyTorch eager before it is timed
(an assertion: a fast wrong answer fails the test). Timings are never asserted: the
summary at the end prints each implementation's speed relative to eager, measured in the
same run, and the performance targets of the other issues with "met" or "missed".

Environment: ``LLMKIT_BENCH_SET`` (shape set, default ``cpu``; ``quick`` for a smoke run,
e.g. with ``--benchmark-disable``), ``LLMKIT_BENCH_THREADS`` (torch threads; ``1`` on a
shared machine), ``LLMKIT_BENCH_COMPILE=1`` (add the slow-to-compile ``torch.compile``
baselines). The machinery is in ``_harness.py``.
"""

from __future__ import annotations

from typing import Any

from _harness import terminal_summary


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminal_summary(terminalreporter)
