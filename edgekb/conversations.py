"""Requests that outlive connections: numbered event logs, followers, resume, grace time.

A request runs as its own task, independent of any socket. Each event it produces gets the next
``seq`` and goes to an in-RAM log (bounded: a request has at most max_tokens deltas plus a few
status events) and, in batches, to SQLite. A connection *follows* a request from a seq: it reads
the log from its cursor, so a slow reader only delays itself, and nothing is buffered per reader.
Finished requests leave RAM after a short linger; resume then reads their log from SQLite.
When the last follower of a running request has been gone for the grace time, it is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from . import sessions
from .answer import AnswerEngine, AnswerOptions
from .errors import Busy, EdgekbError, ProtocolError
from .protocol import ID_REUSE, UNKNOWN_REQUEST, error_event
from .scheduler import FairQueue
from .store import AsyncStore

log = logging.getLogger(__name__)

REPLAY_PAGE = 256
HISTORY_TURNS = 6  # most recent turns offered to the prompt (it keeps what fits)

Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(eq=False)
class RequestRun:
    session_id: str
    id: str
    question: str
    kbs: tuple[str, ...] | None
    events: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    followers: int = 0
    stage: str = "queued"
    cancel: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[None] | None = None
    persisted: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _unsaved: list[dict[str, Any]] = field(default_factory=list)

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        full = {**event, "id": self.id, "seq": len(self.events) + 1}
        self.events.append(full)
        self._unsaved.append(full)
        self._notify()
        return full

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        await self._changed.wait()

    def take_unsaved(self) -> list[dict[str, Any]]:
        batch, self._unsaved = self._unsaved, []
        return batch


class Conversations:
    def __init__(self, store: AsyncStore, answers: AnswerEngine, queue: FairQueue,
                 options: AnswerOptions, grace_s: float, linger_s: float = 30.0) -> None:
        self.store = store
        self.answers = answers
        self.queue = queue
        self.options = options
        self.grace_s = grace_s
        self.linger_s = linger_s
        self.live: dict[tuple[str, str], RequestRun] = {}
        self.closing = False
        # Idle-time work (pre-reading a session's next prompt head) yields to any new question.
        self._idle_cancel = threading.Event()
        self._prefilling: asyncio.Task[None] | None = None

    async def ask(self, session_id: str, user: str, request_id: str, question: str,
                  kbs: tuple[str, ...] | None = None) -> RequestRun:
        self._idle_cancel.set()
        key = (session_id, request_id)
        fresh = key not in self.live and await self.store.write(
            lambda db: sessions.begin_request(db, session_id, request_id, question))
        if not fresh:
            raise ProtocolError(ID_REUSE, f"request id {request_id!r} was already used in this"
                                " session; resume it or use a new id", id=request_id)
        run = RequestRun(session_id, request_id, question, kbs)
        self.live[key] = run
        run.task = asyncio.create_task(self._produce(run, user))
        return run

    def cancel(self, session_id: str, request_id: str) -> bool:
        run = self.live.get((session_id, request_id))
        if run is None or run.finished:
            return False
        run.cancel.set()  # stops generation within one token
        if run.stage == "queued" and run.task is not None:
            run.task.cancel()  # not started yet: leave the queue now
        return True

    async def follow(self, session_id: str, request_id: str, after: int, send: Send) -> None:
        """Send every event of the request with seq > after, live ones as they come."""
        run = self.live.get((session_id, request_id))
        if run is None:
            await self._replay_stored(session_id, request_id, after, send)
            return
        run.followers += 1
        cursor = after
        try:
            while True:
                if cursor < len(run.events):
                    for event in run.events[cursor:]:
                        await send(event)
                        cursor = event["seq"]
                    continue
                if run.finished:
                    return
                await run.changed()
        finally:
            run.followers -= 1
            if run.followers == 0 and not run.finished:
                asyncio.get_running_loop().call_later(self.grace_s, self._grace_expired, run)

    async def _replay_stored(self, session_id: str, request_id: str, after: int,
                             send: Send) -> None:
        state = await self.store.read(
            lambda db: sessions.request_state(db, session_id, request_id))
        if state is None:
            raise ProtocolError(UNKNOWN_REQUEST, f"no request {request_id!r} in this session",
                                id=request_id)
        cursor = after
        for _ in range(state[1] // REPLAY_PAGE + 2):  # bounded: the log has last_seq events
            page = await self.store.read(lambda db: sessions.events_after(
                db, session_id, request_id, cursor, REPLAY_PAGE))
            if not page:
                return
            for event in page:
                await send(event)
                cursor = event["seq"]

    def _grace_expired(self, run: RequestRun) -> None:
        if run.followers == 0 and not run.finished:
            log.info("nobody follows %s/%s any more: cancelling", run.session_id, run.id)
            self.cancel(run.session_id, run.id)

    async def _produce(self, run: RequestRun, user: str) -> None:
        saver = asyncio.create_task(self._save_events(run))
        sources: list[dict[str, Any]] = []
        final: dict[str, Any] = {}
        try:
            async with self.queue.slot(user, lambda p: run.append(
                    {"type": "queued", "position": p})):
                run.stage = "running"
                history = await self.store.read(lambda db: sessions.turns(
                    db, run.session_id, None, HISTORY_TURNS))
                options = replace(self.options, kbs=run.kbs)
                async for event in self.answers.answer(run.question, options, run.cancel,
                                                       history, run.session_id):
                    final = run.append(event)
                    if event["type"] == "sources":
                        sources = event["sources"]
        except asyncio.CancelledError:
            final = run.append(self._interrupted(run) if self.closing else
                               {"type": "done", "finish": "cancelled", "text": "",
                                "usage": {}, "timings": {}})
        except Busy as exc:
            final = run.append(error_event(exc))
        except EdgekbError as exc:
            final = run.append(error_event(exc))
        except Exception:
            log.exception("request %s/%s failed", run.session_id, run.id)
            final = run.append(error_event(EdgekbError("internal error")))
        finally:
            run.finished = True
            run._notify()
        await saver
        await self._finish(run, final, sources)

    async def _finish(self, run: RequestRun, final: dict[str, Any],
                      sources: list[dict[str, Any]]) -> None:
        if final.get("code") == "interrupted":
            state, finish = "interrupted", "interrupted"
        elif final.get("type") == "done":
            state, finish = ("cancelled" if final["finish"] == "cancelled" else "done",
                             final["finish"])
        else:
            state, finish = "failed", final.get("code", "internal")
        answer = final.get("text", "")
        await self.store.write(lambda db: sessions.finish_request(
            db, run.session_id, run.id, state, run.question, answer, sources, finish))
        asyncio.get_running_loop().call_later(
            self.linger_s, self.live.pop, (run.session_id, run.id), None)
        if state == "done" and not self.closing:
            self._prefill_when_idle(run.session_id)

    def _prefill_when_idle(self, session_id: str) -> None:
        if self.queue.busy or (self._prefilling and not self._prefilling.done()):
            return
        self._idle_cancel.clear()
        self._prefilling = asyncio.create_task(self._prefill(session_id))

    async def _prefill(self, session_id: str) -> None:
        try:
            history = await self.store.read(
                lambda db: sessions.turns(db, session_id, None, HISTORY_TURNS))
            await self.answers.prefill(history, session_id, self._idle_cancel)
        except Exception:  # idle-time work: a failure costs only the speed-up
            log.exception("pre-reading the next prompt of session %s failed", session_id)

    async def _save_events(self, run: RequestRun) -> None:
        """Write the log in batches: one transaction per wake-up, not per event."""
        while True:
            batch = run.take_unsaved()
            if batch:
                await self.store.write(lambda db, b=batch: sessions.append_events(
                    db, run.session_id, run.id, b))
                continue
            if run.finished:
                run.persisted.set()
                return
            await run.changed()

    @staticmethod
    def _interrupted(run: RequestRun) -> dict[str, Any]:
        text = "".join(e.get("text", "") for e in run.events if e["type"] == "delta")
        return {"type": "error", "code": "interrupted", "text": text,
                "message": "the server shut down while this answer was being written"}

    async def close(self) -> None:
        """Shutdown: end running requests with an `interrupted` error that carries their text;
        their logs stay resumable after the restart."""
        self.closing = True
        self._idle_cancel.set()
        if self._prefilling:
            await asyncio.gather(self._prefilling, return_exceptions=True)
        runs = [r for r in self.live.values() if r.task and not r.task.done()]
        for run in runs:
            run.task.cancel()  # type: ignore[union-attr]
        await asyncio.gather(*(r.task for r in runs if r.task), return_exceptions=True)
