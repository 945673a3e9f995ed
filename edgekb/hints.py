"""Hints while the technician types: retrieval ahead of the question, only while the LLM rests.

A client sends `typing` with its partial question (a page debounces its keystrokes). The core
keeps the latest text of each connection (a newer text replaces one not yet looked up) and one
worker looks them up one at a time, only while no answer is queued or running: the embedder and
SQLite share the two cores with llama.cpp, whose decode loses a fifth of its speed to 10 % of a
busy core. A question that starts while a lookup is in flight waits for it (``quiet``, a few
milliseconds), so no lookup ever runs beside a decode; lookups that arrive meanwhile wait for the
answer to end. A hint is disposable: it is dropped, never queued, when its connection's outbox
is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from . import events
from .prefetch import normalise

log = logging.getLogger(__name__)

MIN_CHARS = 4          # shorter text finds nothing worth showing
MAX_PENDING = 1024     # connections with a text waiting; the oldest are forgotten

LookUp = Callable[[str, "tuple[str, ...] | None"], Awaitable[list[dict[str, Any]]]]
Offer = Callable[[dict[str, Any]], None]  # hands a hint to a connection without waiting


class Hints:
    def __init__(self, lookup: LookUp, llm_idle: Callable[[], bool]) -> None:
        self._lookup = lookup
        self._llm_idle = llm_idle
        self._pending: OrderedDict[Hashable, tuple[str, tuple[str, ...] | None, Offer]] = \
            OrderedDict()
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._current: asyncio.Future[list[dict[str, Any]]] | None = None
        self.looked_up = 0  # lookups done (for /api/status and tests)

    def typing(self, key: Hashable, text: str, kbs: tuple[str, ...] | None,
               offer: Offer) -> None:
        """The latest partial question of ``key`` (a connection); too short: forget it."""
        text = normalise(text)
        self._pending.pop(key, None)
        if len(text) < MIN_CHARS:
            return
        self._pending[key] = (text, kbs, offer)
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        self._wake.set()

    def forget(self, key: Hashable) -> None:
        self._pending.pop(key, None)

    def llm_free(self) -> None:
        """An answer ended: deferred lookups may run if nothing else waits for the LLM."""
        self._wake.set()

    async def quiet(self) -> None:
        """Wait for the lookup in flight, if any (a question is about to use the cores)."""
        current = self._current
        if current is not None:
            await asyncio.wait([current])

    async def close(self) -> None:
        self._pending.clear()
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    async def _work(self) -> None:
        while True:
            if not self._pending or not self._llm_idle():
                self._wake.clear()
                await self._wake.wait()
                continue
            _, (text, kbs, offer) = self._pending.popitem(last=False)
            self._current = asyncio.ensure_future(self._lookup(text, kbs))
            try:
                entries = await self._current
            except Exception:  # a hint is a nicety: a failure costs only the hint
                log.exception("looking up a hint failed")
                continue
            finally:
                self._current = None
            self.looked_up += 1
            with contextlib.suppress(Exception):
                offer(events.hint("typing", entries, text=text))
