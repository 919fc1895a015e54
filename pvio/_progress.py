"""A small dependency-free progress bar for byte transfers (stderr by default).

``Progress(total, label="copy")`` draws one line, redrawn in place with ``\\r``::

    copy  [########..........]  24.0 MiB / 64.0 MiB  37%  118.2 MiB/s  ETA 0:00

``update(n)`` adds transferred bytes (redraws at most every ``interval``
seconds), ``close()`` draws the final state and ends the line. By default the
bar is shown only when the stream is a terminal; ``enabled=True`` forces it.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; exact bytes below 1 KiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in _UNITS[1:]:
        n /= 1024
        if n < 1024 or unit == _UNITS[-1]:
            break
    return f"{n:.1f} {unit}"


def human_duration(seconds: float) -> str:
    """75 -> '1:15', 3700 -> '1:01:40'."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """A byte-transfer progress line: bar, bytes, percent, rate, ETA."""

    def __init__(self, total: int, *, label: str = "", stream: TextIO | None = None,
                 enabled: bool | None = None, interval: float = 0.1,
                 clock=time.monotonic) -> None:
        self.total = max(0, total)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.interval = interval
        self.done = 0
        self._clock = clock
        self._start = clock()
        self._last_draw = float("-inf")
        self._closed = False

    def __enter__(self) -> Progress:
        self.draw()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def elapsed(self) -> float:
        return self._clock() - self._start

    def rate(self) -> float:
        """Bytes per second since the start (0 until time has passed)."""
        elapsed = self.elapsed
        return self.done / elapsed if elapsed > 0 else 0.0

    def update(self, n: int) -> None:
        self.done += n
        if self.enabled and self._clock() - self._last_draw >= self.interval:
            self.draw()

    def render(self, width: int = 80) -> str:
        """The line as it would be drawn ``width`` columns wide (no ``\\r``)."""
        rate = self.rate()
        if self.total:
            frac = min(1.0, self.done / self.total)
            sizes = f"{human_bytes(self.done)} / {human_bytes(self.total)}"
            pct = f"{frac * 100:3.0f}%"
        else:
            frac = 1.0 if self._closed else 0.0
            sizes, pct = human_bytes(self.done), ""
        if self._closed:
            tail = f"in {human_duration(self.elapsed)}"
        elif rate > 0 and self.total:
            tail = f"ETA {human_duration(max(0, self.total - self.done) / rate)}"
        else:
            tail = "ETA --:--"
        fields = [sizes, pct, f"{human_bytes(rate)}/s", tail]
        text = "  ".join(f for f in fields if f)
        head = f"{self.label}  " if self.label else ""
        if len(head) + len(text) > width - 1:
            head = ""  # a narrow terminal: the numbers matter more than the label
        room = width - 1 - len(head) - len(text) - 4
        if room >= 10:
            bar_width = min(room, 40)
            filled = int(frac * bar_width)
            bar = "[" + "#" * filled + "." * (bar_width - filled) + "]  "
        else:
            bar = ""
        return (head + bar + text)[:max(1, width - 1)]

    def draw(self) -> None:
        if not self.enabled:
            return
        self._last_draw = self._clock()
        width = shutil.get_terminal_size((80, 24)).columns
        self.stream.write("\r" + self.render(width).ljust(max(1, width - 1)))
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self.draw()
            self.stream.write("\n")
            self.stream.flush()
