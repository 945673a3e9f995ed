"""One writer per data dir: the server and `edgekb ingest` take the same exclusive lock.

Two processes saving index.bin at once would each overwrite the other's index; the lock turns
that into a clear error instead. The kernel drops a flock when its process dies, kill -9 included.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import EdgekbError


class DataDirBusy(EdgekbError):
    code = "data_dir_busy"


@contextmanager
def exclusive(data_dir: Path, purpose: str) -> Iterator[None]:
    data_dir.mkdir(parents=True, exist_ok=True)
    lock_path = data_dir / "edgekb.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise DataDirBusy(f"{data_dir} is in use ({holder}); stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{purpose}, pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)
