"""The audit trail: one JSON object per line, appended, rotated by size.

Each line has time, user, address, event, request id and outcome, plus event details. It never
holds a token, a password or (unless audit.question_text is on) a question's text: callers pass
only the fields below, and ``record`` drops any detail named like a secret.

Each line is one write(2) on an O_APPEND descriptor, done as the event happens: once it
returns, the line is in the kernel and survives the process being killed; a background thread
fsyncs at most every SYNC_EVERY_S, so a power cut loses at most the lines of that last moment,
and a torn last line is skipped by readers. Rotation renames audit.log to audit.log.1 (and so
on, ``keep`` files) once it passes ``max_bytes``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SYNC_EVERY_S = 0.5
COALESCE_S = 1.0      # a flood of one kind of refusal from one address: a line or two a second
MAX_COALESCED = 1024  # keys remembered for that
MAX_DETAIL_CHARS = 200
_SECRET_WORDS = ("token", "password", "secret", "cookie", "authorization", "csrf")


@dataclass
class _Held:
    """Lines of one coalescing key held back in the current window."""

    since: float
    count: int = 0
    last: dict[str, Any] | None = None


class AuditLog:
    def __init__(self, path: Path, max_bytes: int, keep: int,
                 question_text: bool = False) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.question_text = question_text
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size
        self._dirty = threading.Event()
        self._stopping = threading.Event()
        self._closed = False
        self._lock = threading.Lock()  # the server writes from the loop, the CLI from its thread
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._syncer = threading.Thread(target=self._sync_loop, name="audit-sync", daemon=True)
        self._syncer.start()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def record(self, event: str, *, user: str = "", address: str = "", request: str = "",
               outcome: str = "ok", coalesce: str | None = None, **details: Any) -> None:
        """One line. With ``coalesce``, only the first line of a key in each COALESCE_S window
        is written at once; the others of that window become one line with ``count`` (the
        events it stands for), written when the window ends. A flood of refusals from one
        address thus costs a few lines a second, and the totals stay exact."""
        line: dict[str, Any] = {"time": round(time.time(), 3), "event": event, "user": user,
                                "address": address, "request": request, "outcome": outcome}
        for key, value in details.items():
            if value is None or any(word in key.lower() for word in _SECRET_WORDS):
                continue
            if key == "question" and not self.question_text:
                continue
            if isinstance(value, str) and len(value) > MAX_DETAIL_CHARS and key != "question":
                value = value[:MAX_DETAIL_CHARS] + "…"
            line[key] = value
        if coalesce is not None and self._hold(coalesce, line):
            return
        self._append(line)

    def _hold(self, key: str, line: dict[str, Any]) -> bool:
        """True when the line is held back for the key's window summary."""
        now = time.monotonic()
        evicted: list[dict[str, Any]] = []
        with self._lock:
            held = self._held.get(key)
            if held is not None and now - held.since < COALESCE_S:
                held.count += 1
                held.last = line
                return True
            if held is not None and held.count and held.last is not None:
                evicted.append({**held.last, "count": held.count})  # the window just ended
            self._held[key] = _Held(now)
            self._held.move_to_end(key)
            while len(self._held) > MAX_COALESCED:
                _, old = self._held.popitem(last=False)
                if old.count and old.last is not None:
                    evicted.append({**old.last, "count": old.count})
        for summary in evicted:
            self._append(summary)
        return False

    def _append(self, line: dict[str, Any]) -> None:
        data = (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._closed:
                return
            if self._size + len(data) > self.max_bytes and self._size > 0:
                self._rotate()
            os.write(self._fd, data)  # a page-cache write: microseconds, never the disk
            self._size += len(data)
        self._dirty.set()

    def _flush_held(self, everything: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            due = [(key, held) for key, held in self._held.items()
                   if held.count and (everything or now - held.since >= COALESCE_S)]
            for key, held in due:
                self._held[key] = _Held(now)
        for _, held in due:
            assert held.last is not None
            self._append({**held.last, "count": held.count})

    def _rotate(self) -> None:
        # No fsync here (it would stall the event loop on a slow card): the renamed file's
        # pages reach the disk as the kernel writes them back, like any line before a cut.
        os.close(self._fd)
        for number in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{number}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{number + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._fd = self._open()
        self._size = 0

    def _sync_loop(self) -> None:
        """fsync at most every SYNC_EVERY_S while lines come; write window summaries."""
        while not self._stopping.is_set():
            dirty = self._dirty.wait(timeout=COALESCE_S)
            self._flush_held()
            if not dirty:
                continue
            self._dirty.clear()
            with self._lock:
                if self._closed:
                    return
                fd = os.dup(self._fd)
            try:
                os.fsync(fd)  # outside the lock: an SD card may take long
            finally:
                os.close(fd)
            self._stopping.wait(SYNC_EVERY_S)

    def close(self) -> None:
        self._flush_held(everything=True)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.fsync(self._fd)
            os.close(self._fd)
        self._stopping.set()
        self._dirty.set()
        self._syncer.join(timeout=5)


def read_lines(path: Path, last: int) -> list[dict[str, Any]]:
    """The last ``last`` well-formed lines, oldest first, across audit.log and audit.log.1."""
    lines: list[dict[str, Any]] = []
    for candidate in (path, path.with_name(f"{path.name}.1")):
        if len(lines) >= last or not candidate.exists():
            continue
        older = [entry for entry in _parse(_tail_bytes(candidate, last))]
        lines = older[-(last - len(lines)):] + lines
    return lines[-last:]


def _tail_bytes(path: Path, last: int) -> list[bytes]:
    """At most ``last`` whole lines from the end of the file, read backwards in blocks."""
    block = 64 * 1024
    with path.open("rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        data = b""
        position = end
        while position > 0 and data.count(b"\n") <= last:
            step = min(block, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + data
    rows = data.split(b"\n")
    if position > 0:
        rows = rows[1:]  # the first row may be the end of a line we did not read whole
    return [row for row in rows if row][-last:]


def _parse(rows: list[bytes]) -> Iterator[dict[str, Any]]:
    for row in rows:
        try:
            entry = json.loads(row)
        except ValueError:
            continue  # a line torn by a power cut
        if isinstance(entry, dict):
            yield entry


def follow(path: Path, poll_s: float = 0.5) -> Iterator[dict[str, Any]]:
    """New lines as they are appended (for `edgekb audit tail --follow`), across rotations."""
    handle = path.open("rb")
    handle.seek(0, os.SEEK_END)
    inode = os.fstat(handle.fileno()).st_ino
    partial = b""
    while True:
        chunk = handle.readline()
        if chunk:
            partial += chunk
            if partial.endswith(b"\n"):
                yield from _parse([partial.strip()])
                partial = b""
            continue
        try:
            if path.stat().st_ino != inode:  # rotated: continue in the new file
                handle.close()
                handle = path.open("rb")
                inode = os.fstat(handle.fileno()).st_ino
                continue
        except FileNotFoundError:
            pass
        time.sleep(poll_s)
