"""A request's numbered event log while it runs: in RAM, saved to SQLite in batches, and
released to followers only once saved.

Each event gets the next ``seq`` and is encoded once; the same frame goes to SQLite, to every
follower and to replays. Followers are sent only what is already in SQLite, so after a kill -9
or a power cut no client holds an event (or a `done`) that the restarted server does not know,
and a seq is never given twice. When a write fails (a full SD card), nothing unsaved is
released: the request ends with a typed ``storage_error`` that carries the text the failed
batch held, stored when the disk allows and sent either way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from . import events, sessions
from .errors import StorageError
from .sessions import Ending
from .store import AsyncStore

log = logging.getLogger(__name__)

Send = Callable[[str], Awaitable[None]]  # one encoded frame


@dataclass(frozen=True)
class RequestOptions:
    """How one request is answered, beyond its question."""

    retrieval: bool = True   # False: the model answers alone, without sources
    # Earlier (question, answer) pairs the client keeps itself, in place of the session's
    # stored turns. Such a conversation lives in the client: no KV snapshot, no pre-reading.
    conversation: tuple[tuple[str, str], ...] | None = None
    detached: bool = False   # never cancelled for want of followers (it runs to its end)


@dataclass(eq=False)
class RequestRun:
    session_id: str
    id: str
    user: str
    question: str
    kbs: tuple[str, ...] | None
    options: RequestOptions = field(default_factory=RequestOptions)
    frames: list[str] = field(default_factory=list)  # events, encoded once: wire and SQLite
    saved: int = 0                 # frames[:saved] are in SQLite; only those are sent
    ending: Ending | None = None   # set with the last event, and stored with it
    # The last frame when it could not be stored: sent to followers after the saved ones,
    # without a seq (it is not part of the log).
    unsaved_end: str | None = None
    created_at: float = field(default_factory=time.time)
    followers: int = 0
    follows: int = 0               # follows so far (all but the first are resumes)
    grace: asyncio.TimerHandle | None = None  # one per run: cancelled when someone follows
    stage: str = "new"             # new (task not started yet), queued, running
    cancel: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[None] | None = None
    saver: asyncio.Task[None] | None = None
    _produced: asyncio.Event = field(default_factory=asyncio.Event)
    _saved_changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def finished(self) -> bool:
        """The last event has been produced (it may not be saved yet)."""
        return self.ending is not None or self.unsaved_end is not None

    @property
    def complete(self) -> bool:
        """Nothing more will be saved: every event is, or the store failed."""
        return self.unsaved_end is not None or (
            self.ending is not None and self.saved == len(self.frames))

    def append(self, event: dict[str, Any]) -> None:
        if self.finished:
            return  # after a storage failure the producer may still be winding down
        self.frames.append(events.encode({**event, "id": self.id,
                                          "seq": len(self.frames) + 1}))
        self._produced.set()

    def finish(self, event: dict[str, Any], ending: Ending) -> None:
        if self.finished:
            return
        self.append(event)
        self.ending = ending

    def mark_saved(self, upto: int) -> None:
        self.saved = upto
        self._changed()

    def _changed(self) -> None:
        self._saved_changed.set()
        self._saved_changed = asyncio.Event()

    async def produced(self) -> None:
        await self._produced.wait()
        self._produced.clear()

    async def saved_changed(self) -> None:
        await self._saved_changed.wait()

    def text(self) -> str:
        """The answer so far (decodes the log: only for endings, never per event)."""
        return sessions.logged_text(self.frames)[0]

    async def follow(self, after: int, send: Send, live: bool = True) -> None:
        """Send the saved events with seq > after, then (``live``) the later ones as they are
        saved."""
        cursor = after
        while True:
            if cursor < self.saved:
                for seq in range(cursor + 1, self.saved + 1):
                    await send(self.frames[seq - 1])
                    cursor = seq
                continue
            if not live:
                return
            if self.complete:
                if self.unsaved_end is not None:
                    await send(self.unsaved_end)
                return
            await self.saved_changed()


class LogWriter:
    """Saves one run's log in batches, one transaction per wake-up, then releases them."""

    def __init__(self, store: AsyncStore, on_ended: Callable[[RequestRun, Ending], None]) -> None:
        self.store = store
        self.on_ended = on_ended

    async def run(self, run: RequestRun) -> None:
        while not run.complete:
            upto = len(run.frames)
            if upto == run.saved:
                await run.produced()
                continue
            batch = [(seq, run.frames[seq - 1]) for seq in range(run.saved + 1, upto + 1)]
            ending = run.ending if run.ending is not None and upto == len(run.frames) else None
            try:
                await self.store.write(lambda db: sessions.append_events(
                    db, run.session_id, run.id, batch, ending))
            except Exception as exc:
                log.error("could not store events of %s/%s: %s", run.session_id, run.id, exc)
                await self._fail(run, exc)
                return
            run.mark_saved(upto)
            if ending is not None:
                self.on_ended(run, ending)

    async def _fail(self, run: RequestRun, exc: Exception) -> None:
        """End the request with storage_error in place of everything not yet saved."""
        run.cancel.set()  # the answer stops within one token; its later events are ignored
        unsaved = [json.loads(frame) for frame in run.frames[run.saved:]]
        tail = "".join(e["text"] for e in unsaved if e["type"] == "delta")
        text = run.text()
        del run.frames[run.saved:]
        error = StorageError("the appliance could not store this answer (is its disk full?); "
                             "the text so far is kept here", text=tail)
        final = events.error(error)
        sources = sessions.logged_text(run.frames)[1]
        ending = Ending("failed", run.question, text, sources, error.code)
        framed = events.encode({**final, "id": run.id, "seq": run.saved + 1})
        try:
            await self.store.write(lambda db: sessions.append_events(
                db, run.session_id, run.id, [(run.saved + 1, framed)], ending))
        except Exception:  # still failing: send it without a seq, it is not in the log
            run.unsaved_end = events.encode({**final, "id": run.id})
            run._changed()
            return
        run.frames.append(framed)
        run.ending = ending
        run.mark_saved(len(run.frames))
        self.on_ended(run, ending)
