"""A one-line progress bar on stderr, drawn only when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


class ProgressBar:
    """``[#####.....] 12/40 what is running  (elapsed)``, redrawn in place.

    Silent when ``stream`` is not a TTY (pipes, CI logs, tests) unless ``force``.
    """

    def __init__(self, total: int, stream: TextIO | None = None, force: bool = False, width: int = 30):
        self.total = max(total, 0)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = force or bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self.start = time.perf_counter()
        self.count = 0

    def update(self, done: int, what: str = "") -> None:
        """Show ``done`` of ``total`` finished, ``what`` running now."""
        self.count = done
        if not self.enabled:
            return
        filled = int(self.width * done / self.total) if self.total else self.width
        elapsed = time.perf_counter() - self.start
        line = f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {what[:50]:50} {elapsed:6.1f}s"
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        """Draw the full bar and end the line."""
        if self.enabled:
            self.update(self.total, "done")
            self.stream.write("\n")
            self.stream.flush()


def progress_callback() -> Callable[[int, int, str], None]:
    """A ``progress(done, total, what)`` callback drawing a :class:`ProgressBar` (created on first call)."""
    bar: ProgressBar | None = None

    def progress(i: int, n: int, what: str) -> None:
        nonlocal bar
        if bar is None:
            bar = ProgressBar(n)
        if i >= n:
            bar.close()
        else:
            bar.update(i, what)

    return progress
