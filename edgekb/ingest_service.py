"""The server's one ingest thread.

Uploads and reindexing run here, one job at a time, so parsing and embedding never touch the
event loop and never race each other on the index. The ingestor reads through its own
read-only SQLite connection and writes through the store's one writer thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import memtrim
from .ingest import Ingestor
from .store import Store


class IngestService:

    def __init__(self, make: Callable[[Store], Ingestor], db_path: Path) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ingest")
        self._make = make
        self._db_path = db_path
        self._ingestor: Ingestor | None = None

    def _get(self) -> Ingestor:
        if self._ingestor is None:
            self._ingestor = self._make(Store(self._db_path, read_only=True))
        return self._ingestor

    async def run(self, fn: Callable[[Ingestor], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._job, fn)

    def _job(self, fn: Callable[[Ingestor], Any]) -> Any:
        try:
            return fn(self._get())
        finally:
            memtrim.trim()  # parsing and embedding freed tens of MB; give them back

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._ingestor is not None:
            self._ingestor.store.close()
