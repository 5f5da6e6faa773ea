"""The progress bar of big transfers (``files put``, ``files get``): one line on standard error,
redrawn in place, with the bytes moved, the percentage and the rate:

    data/big.bin  12.0 MiB / 24.0 MiB   50% [##########----------]  85.3 MiB/s

Shown only on a terminal, for transfers of at least ``MIN_BYTES``, never with ``--json`` or
``--quiet``. Plain text (a carriage return and spaces, no escape codes), so ``NO_COLOR`` has
nothing to turn off.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TextIO

from corral.services.cli.output import Output

MIN_BYTES = 4 * 1024 * 1024
REDRAW_SECONDS = 0.1
UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def size(count: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in UNITS[:-1]:
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} {UNITS[-1]}"


def _columns(stream: TextIO) -> int:
    """The terminal's width (80 if it does not say)."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    return columns or 80


def _shortened(label: str, width: int) -> str:
    """``label`` in ``width`` characters, its end kept (the file's name)."""
    return label if len(label) <= width else "..." + label[len(label) - width + 3 :]


class ProgressBar:
    """A ``corral.client`` progress callback (``bar(done, total)``) that draws on ``stream``;
    ``close()`` ends its line."""

    def __init__(
        self,
        stream: TextIO,
        label: str,
        *,
        min_bytes: int = MIN_BYTES,
        clock: Callable[[], float] = time.monotonic,
        columns: int | None = None,
    ) -> None:
        self._stream = stream
        self._label = label
        self._min_bytes = min_bytes
        self._clock = clock
        self._columns = columns
        self._start: tuple[float, int] | None = None  # when and at how many bytes it began
        self._drawn_at: float | None = None
        self._width = 0  # of the line on screen, to blank what a shorter one leaves

    def __call__(self, done: int, total: int) -> None:
        if total < self._min_bytes:
            return
        now = self._clock()
        if self._start is None:
            self._start = (now, done)
        last = self._drawn_at is not None and now - self._drawn_at < REDRAW_SECONDS
        if last and done < total:
            return
        self._drawn_at = now
        self._draw(self.render(done, total, now))

    def render(self, done: int, total: int, now: float) -> str:
        began, at_start = self._start or (now, done)
        elapsed = now - began
        rate = f"{size((done - at_start) / elapsed)}/s" if elapsed > 0 else "-- B/s"
        percent = 100 * done // total if total else 100
        # Fixed widths for what changes, so the line does not jitter as it is redrawn.
        counts = f"  {size(done):>10} / {size(total)}  {percent:3d}%"
        tail = f"  {rate:>12}"
        columns = (self._columns or _columns(self._stream)) - 1  # the last column wraps
        fits = max(12, columns - len(counts) - len(tail) - 13)
        label = _shortened(self._label, min(fits, max(24, columns // 3)))
        room = columns - len(label) - len(counts) - len(tail) - 3
        if room < 10:
            return f"{label}{counts}{tail}"[:columns]
        filled = room * done // total if total else room
        return f"{label}{counts} [{'#' * filled}{'-' * (room - filled)}]{tail}"

    def _draw(self, line: str) -> None:
        self._stream.write("\r" + line.ljust(self._width))
        self._stream.flush()
        self._width = len(line)

    def close(self) -> None:
        """End the bar's line (if one was drawn), so what follows starts on its own."""
        if self._drawn_at is not None:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn_at = None


def for_transfer(out: Output, label: str, *, quiet: bool) -> ProgressBar | None:
    """The bar for one transfer, or None: not on a terminal, with --json or with --quiet."""
    isatty = getattr(out.err, "isatty", None)
    if quiet or out.json or not (isatty and isatty()):
        return None
    return ProgressBar(out.err, label)
