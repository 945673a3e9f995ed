"""Logging: one line per event, human or JSON, with the connection and request it belongs to.

The ids live in context variables: a connection's handler sets ``connection_id`` and every
task it starts inherits it; a request's task sets ``request_id``. A filter copies both onto
each record, so no call site passes them.

Under systemd, stderr goes to the journal ($JOURNAL_STREAM names it): lines then start with
the syslog priority (``<3>``), which journald turns into the entry's priority, and carry no
timestamp (the journal has its own). A log file, when configured, is rotated by size.
"""

from __future__ import annotations

import itertools
import json
import logging
import logging.handlers
import os
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TextIO

connection_id: ContextVar[str | None] = ContextVar("connection_id", default=None)
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

_connection_numbers = itertools.count(1)

FORMATS = ("human", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def new_connection_id() -> str:
    """Short, unique in this process: "c17". Set it with ``connection_id.set``."""
    return f"c{next(_connection_numbers)}"


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.conn = connection_id.get()
        record.req = request_id.get()
        return True


def _text(record: logging.LogRecord, formatter: logging.Formatter) -> str:
    """The message with its exception, on one line (a traceback's lines joined by " | ")."""
    text = record.getMessage()
    if record.exc_info:
        text += " | " + formatter.formatException(record.exc_info)
    return " | ".join(line for line in text.splitlines() if line.strip()) or text


def _ids(record: logging.LogRecord) -> str:
    conn, req = getattr(record, "conn", None), getattr(record, "req", None)
    return "".join(f" {name}={value}" for name, value in (("conn", conn), ("req", req))
                   if value)


class HumanFormatter(logging.Formatter):
    """``2026-12-02 10:00:01,234 WARNING edgekb.ws conn=c3 req=Xb3/r1: message``."""

    def __init__(self, timestamps: bool = True) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname} {record.name}{_ids(record)}: {_text(record, self)}"
        return f"{self.formatTime(record)} {line}" if self.timestamps else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (Unix seconds), level, logger, msg, conn, req, exc."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname,
                                "logger": record.name, "msg": record.getMessage(),
                                "conn": getattr(record, "conn", None),
                                "req": getattr(record, "req", None)}
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False)


class JournalFormatter(logging.Formatter):
    """Another formatter's line behind the syslog priority that journald takes off."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{self.inner.format(record)}"


def stderr_is_journal(stream: TextIO = sys.stderr) -> bool:
    """True when systemd connected this stream to the journal (sd_journal_stream_fd)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{stat.st_dev}:{stat.st_ino}"


def setup(level: str = "WARNING", fmt: str = "human", file: Path | None = None,
          file_max_mb: int = 10, file_backups: int = 3) -> None:
    """Replace the root logger's handlers: stderr, and a size-rotated file if ``file``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    journal = stderr_is_journal()
    line: logging.Formatter = JsonFormatter() if fmt == "json" else HumanFormatter(not journal)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(JournalFormatter(line) if journal else line)
    handlers: list[logging.Handler] = [stderr]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        rotating = logging.handlers.RotatingFileHandler(
            file, maxBytes=file_max_mb * 1024 * 1024, backupCount=file_backups,
            encoding="utf-8")
        rotating.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
        handlers.append(rotating)
    for handler in handlers:
        handler.addFilter(_ContextFilter())
        root.addHandler(handler)
    root.setLevel(level.upper())
