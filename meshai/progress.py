"""A tiny progress bar on stderr for long work (shown on a terminal, or when MESHAI_PROGRESS=1)."""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType
from typing import TextIO


class Progress:
    """``with Progress("planning", total=300) as bar: bar.advance()``; silent when not wanted."""

    def __init__(
        self, label: str, total: int, stream: TextIO | None = None, enabled: bool | None = None
    ) -> None:
        self.label = label
        self.total = max(0, total)
        self.done = 0
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = os.environ.get("MESHAI_PROGRESS") == "1" or self.stream.isatty()
        self.enabled = enabled and os.environ.get("MESHAI_PROGRESS") != "0"
        self._t0 = time.monotonic()
        self._last = 0.0

    def __enter__(self) -> Progress:
        self._draw(force=True)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._draw(force=True)
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more units done."""
        self.done += n
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        frac = self.done / self.total if self.total else 1.0
        width = 30
        fill = int(frac * width)
        elapsed = now - self._t0
        self.stream.write(
            f"\r{self.label:<14} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {elapsed:5.1f}s"
        )
        self.stream.flush()
