"""A dependency-free progress display for long blocking work (model fetch, ingest).

On a terminal it redraws one line on stderr (percent, amount done/total, rate), at most ten times a
second so a fast copy is not slowed by drawing. Elsewhere (CI logs, journald) each label gets one
line when it starts and one when it ends, so logs stay readable.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO


class ProgressBar:
    """A ``progress(label, done, total)`` callback; ``total`` None means unknown.

    A new label (or ``done`` going backwards: a retry) ends the current line. Call it from one
    thread; use it as a context manager so the last line is ended.
    """

    def __init__(self, stream: TextIO | None = None, *, unit: str = "B",
                 min_interval: float = 0.1, clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty()
        self._unit = unit
        self._min_interval = min_interval
        self._clock = clock
        self._label: str | None = None
        self._ended: tuple[str, int] | None = None
        self._started = 0.0
        self._last_draw = 0.0
        self._done = 0
        self._total: int | None = None

    def __call__(self, label: str, done: int, total: int | None) -> None:
        if (label, done) == self._ended:
            return  # a repeated final report
        now = self._clock()
        if label != self._label or done < self._done:
            self.close()
            self._begin(label, now, total)
        self._done, self._total = done, total
        finished = total is not None and done >= total
        if self._tty and (finished or now - self._last_draw >= self._min_interval):
            self._draw(now)
        if finished:
            self.close()

    def close(self) -> None:
        """End the current label's line."""
        if self._label is None:
            return
        now = self._clock()
        if self._tty:
            self._draw(now)
            self._stream.write("\n")
        else:
            self._stream.write(f"{self._label}: {self._status(now)}\n")
        self._stream.flush()
        self._ended = (self._label, self._done)
        self._label = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _begin(self, label: str, now: float, total: int | None) -> None:
        self._label, self._started, self._done, self._ended = label, now, 0, None
        if not self._tty:
            size = f" ({self._amount(total)})" if total is not None else ""
            self._stream.write(f"{label}{size} ...\n")
            self._stream.flush()

    def _draw(self, now: float) -> None:
        width = max(20, shutil.get_terminal_size().columns - 1)
        line = f"{self._label}  {self._status(now)}"
        # \r returns to the line start, \x1b[K clears what a longer previous line left.
        self._stream.write("\r" + line[:width] + "\x1b[K")
        self._stream.flush()
        self._last_draw = now

    def _status(self, now: float) -> str:
        parts = []
        if self._total:
            parts.append(f"{100 * self._done / self._total:3.0f}%")
            parts.append(f"{self._amount(self._done, bare=True)}/{self._amount(self._total)}")
        else:
            parts.append(self._amount(self._done))
        elapsed = now - self._started
        if elapsed > 0:
            parts.append(f"{self._amount(int(self._done / elapsed))}/s")
        if not self._tty:
            parts.append(f"in {elapsed:.1f} s")
        return "  ".join(parts)

    def _amount(self, n: int, bare: bool = False) -> str:
        if self._unit == "B":
            text = f"{n / 1e6:.1f}"
            return text if bare else f"{text} MB"
        return str(n) if bare else f"{n} {self._unit}"


class FileProgress:
    """Ingest progress, one file at a time (``Ingestor.on_progress``, and ``result`` for each
    file's outcome).

    On a terminal one line is redrawn per file: "[2/5] manual.pdf  reading…", then
    "[2/5] manual.pdf  embedding 120/602 chunks  20%  24 chunks/s", and replaced by the file's
    result. Elsewhere (CI logs, journald) a file gets a plain line when its chunks start
    embedding and one with its result, so a long file is never silent.
    """

    def __init__(self, stream: TextIO | None = None, *, files: int | None = None,
                 min_interval: float = 0.1, clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty()
        self._files = files
        self._min_interval = min_interval
        self._clock = clock
        self._index = 0
        self._path = ""
        self._started = 0.0
        self._last_draw = 0.0
        self._announced = False
        self._drawn = False

    def __call__(self, path: str, done: int, total: int | None) -> None:
        now = self._clock()
        if total is None:  # a file starts
            self._index += 1
            self._path, self._started, self._announced = path, now, False
            if self._tty:
                self._draw(f"{self._label()}  reading…", now)
            return
        if not self._tty:
            if not self._announced:
                self._announced = True
                self._stream.write(f"{self._label()}: embedding {total} chunks\n")
                self._stream.flush()
            return
        if done < total and now - self._last_draw < self._min_interval:
            return
        elapsed = now - self._started
        rate = f"  {done / elapsed:.0f} chunks/s" if elapsed > 0 and done else ""
        self._draw(f"{self._label()}  embedding {done}/{total} chunks  "
                   f"{100 * done / max(total, 1):3.0f}%{rate}", now)

    def result(self, line: str) -> None:
        """A file's outcome, on a line of its own (replacing the progress line)."""
        if self._drawn:
            self._stream.write("\r\x1b[K")
            self._drawn = False
        self._stream.write(line + "\n")
        self._stream.flush()

    def _label(self) -> str:
        name = self._path.rsplit("/", 1)[-1]
        return f"[{self._index}/{self._files}] {name}" if self._files else name

    def _draw(self, line: str, now: float) -> None:
        width = max(20, shutil.get_terminal_size().columns - 1)
        self._stream.write("\r" + line[:width] + "\x1b[K")
        self._stream.flush()
        self._last_draw = now
        self._drawn = True
