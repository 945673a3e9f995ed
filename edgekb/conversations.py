"""Requests that outlive connections: numbered event logs, followers, resume, grace time.

A request runs as its own task, independent of any socket. Each event it produces gets the next
``seq`` and goes to an in-RAM log (bounded: a request has at most max_tokens deltas plus a few
status events) and, in batches, to SQLite. Followers are sent only what is already in SQLite:
after a kill -9 or a power cut no client can hold an event (or a `done`) that the restarted
server does not know, so a seq is never given twice. A connection *follows* a request from a
seq: it reads the log from its cursor, so a slow reader only delays itself, and nothing is
buffered per reader. Finished requests leave RAM after a short linger; resume then reads their
log from SQLite. When the last follower of a running request has been gone for the grace time,
it is cancelled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from . import logs, sessions
from .answer import AnswerEngine, AnswerOptions
from .errors import Busy, EdgekbError, ProtocolError
from .protocol import ID_REUSE, UNKNOWN_REQUEST, encode, error_event
from .scheduler import FairQueue
from .sessions import Ending
from .store import AsyncStore

log = logging.getLogger(__name__)

REPLAY_PAGE = 256
HISTORY_TURNS = 6  # most recent turns offered to the prompt (it keeps what fits)
MAX_HEADS_WAITING = 8  # sessions whose next prompt head waits to be pre-read when idle

Send = Callable[[str], Awaitable[None]]  # one encoded frame


@dataclass(eq=False)
class RequestRun:
    session_id: str
    id: str
    question: str
    kbs: tuple[str, ...] | None
    frames: list[str] = field(default_factory=list)  # events, encoded once: wire and SQLite
    saved: int = 0                 # frames[:saved] are in SQLite; only those are sent
    ending: Ending | None = None   # set with the last event, and stored with it
    followers: int = 0
    stage: str = "new"             # new (task not started yet), queued, running
    cancel: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[None] | None = None
    saver: asyncio.Task[None] | None = None
    _produced: asyncio.Event = field(default_factory=asyncio.Event)
    _saved_changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def finished(self) -> bool:
        """The last event has been produced (it may not be saved yet)."""
        return self.ending is not None

    @property
    def complete(self) -> bool:
        """Every event, the last one included, is saved."""
        return self.finished and self.saved == len(self.frames)

    def append(self, event: dict[str, Any]) -> None:
        self.frames.append(encode({**event, "id": self.id, "seq": len(self.frames) + 1}))
        self._produced.set()

    def finish(self, event: dict[str, Any], ending: Ending) -> None:
        self.append(event)
        self.ending = ending

    def mark_saved(self, upto: int) -> None:
        self.saved = upto
        self._saved_changed.set()
        self._saved_changed = asyncio.Event()

    async def produced(self) -> None:
        await self._produced.wait()
        self._produced.clear()

    async def saved_changed(self) -> None:
        await self._saved_changed.wait()


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
        # Idle-time work: pre-reading the next prompt head of sessions that just got an answer.
        # It yields to any other session's question and resumes when the LLM is idle again.
        self._heads_waiting: OrderedDict[str, None] = OrderedDict()
        self._idle_cancel = threading.Event()
        self._prefilling: asyncio.Task[None] | None = None
        self._prefilling_session: str | None = None

    async def ask(self, session_id: str, user: str, request_id: str, question: str,
                  kbs: tuple[str, ...] | None = None) -> RequestRun:
        if self.closing:
            raise Busy("the server is going down; ask again in a moment", retry_after=10)
        key = (session_id, request_id)
        fresh = key not in self.live and await self.store.write(
            lambda db: sessions.begin_request(db, session_id, request_id, question))
        if not fresh:
            raise ProtocolError(ID_REUSE, f"request id {request_id!r} was already used in this"
                                " session; resume it or use a new id", id=request_id)
        # No await from here until the run is live, so no idle work can start in between.
        # A head being pre-read for this very session is the start of this prompt: let it run.
        if self._prefilling_session != session_id:
            self._idle_cancel.set()
        self._heads_waiting.pop(session_id, None)
        run = RequestRun(session_id, request_id, question, kbs)
        self.live[key] = run
        run.task = asyncio.create_task(self._produce(run, user))
        return run

    async def cancel(self, session_id: str, request_id: str) -> None:
        """Stop a request within one token. Cancelling one that already ended does nothing
        (its `done` is on the way); an id this session never used is a typed error."""
        run = self.live.get((session_id, request_id))
        if run is None:
            if await self.store.read(lambda db: sessions.request_state(
                    db, session_id, request_id)) is None:
                raise ProtocolError(UNKNOWN_REQUEST, f"no request {request_id!r} in this"
                                    " session", id=request_id)
            return
        self._stop(run)

    def _stop(self, run: RequestRun) -> None:
        if run.finished:
            return
        run.cancel.set()  # generating: stops within one token; new: never queues
        if run.stage == "queued" and run.task is not None:
            run.task.cancel()  # waiting for the LLM: leave the queue now

    async def follow(self, session_id: str, request_id: str, after: int, send: Send) -> None:
        """Send every saved event of the request with seq > after, live ones as they come."""
        run = self.live.get((session_id, request_id))
        if run is None:
            await self._replay_stored(session_id, request_id, after, send)
            return
        run.followers += 1
        cursor = after
        try:
            while True:
                if cursor < run.saved:
                    for seq in range(cursor + 1, run.saved + 1):
                        await send(run.frames[seq - 1])
                        cursor = seq
                    continue
                if run.complete:
                    return
                await run.saved_changed()
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
            page = await self.store.read(lambda db: sessions.frames_after(
                db, session_id, request_id, cursor, REPLAY_PAGE))
            if not page:
                return
            for seq, frame in page:
                await send(frame)
                cursor = seq

    def _grace_expired(self, run: RequestRun) -> None:
        if run.followers == 0 and not run.finished:
            log.info("nobody follows %s/%s any more: cancelling", run.session_id, run.id)
            self._stop(run)

    async def _produce(self, run: RequestRun, user: str) -> None:
        logs.request_id.set(f"{run.session_id}/{run.id}")  # on every log line of this task
        run.saver = asyncio.create_task(self._save_events(run))
        sources: list[dict[str, Any]] = []
        final: dict[str, Any] = {}
        try:
            run.stage = "queued"
            if run.cancel.is_set():  # cancelled before its task first ran
                raise asyncio.CancelledError
            async with self.queue.slot(user, lambda p: run.append(
                    {"type": "queued", "position": p})):
                run.stage = "running"
                history = await self.store.read(lambda db: sessions.turns(
                    db, run.session_id, None, HISTORY_TURNS))
                options = replace(self.options, kbs=run.kbs)
                async for event in self.answers.answer(run.question, options, run.cancel,
                                                       history, run.session_id):
                    if event["type"] == "done":
                        final = event  # held back: it goes out with the turn, below
                        continue
                    run.append(event)
                    if event["type"] == "sources":
                        sources = event["sources"]
        except asyncio.CancelledError:
            final = (self._interrupted(run) if self.closing else
                     {"type": "done", "finish": "cancelled", "text": "", "usage": {},
                      "timings": {}})
        except Busy as exc:
            final = error_event(exc)
        except EdgekbError as exc:
            final = error_event(exc)
        except Exception:
            log.exception("request %s/%s failed", run.session_id, run.id)
            final = error_event(EdgekbError("internal error"))
        if not final:  # the engine ended without `done`: never leave a request open
            final = error_event(EdgekbError("internal error"))
        run.finish(final, self._ending(run, final, sources))
        await asyncio.shield(run.saver)  # the log is written to its end even at shutdown

    @staticmethod
    def _ending(run: RequestRun, final: dict[str, Any],
                sources: list[dict[str, Any]]) -> Ending:
        if final.get("code") == "interrupted":
            state, finish = "interrupted", "interrupted"
        elif final.get("type") == "done":
            state = "cancelled" if final["finish"] == "cancelled" else "done"
            finish = final["finish"]
        else:
            state, finish = "failed", final.get("code", "internal")
        return Ending(state, run.question, final.get("text", ""), sources, finish)

    async def _save_events(self, run: RequestRun) -> None:
        """Write the log in batches, one transaction per wake-up, and only then release the
        events to followers. The last batch also stores the turn."""
        while not run.complete:
            upto = len(run.frames)
            if upto == run.saved:
                await run.produced()
                continue
            batch = [(seq, run.frames[seq - 1]) for seq in range(run.saved + 1, upto + 1)]
            ending = run.ending if run.finished and upto == len(run.frames) else None
            try:
                await self.store.write(lambda db: sessions.append_events(
                    db, run.session_id, run.id, batch, ending))
            except Exception:  # a lost write costs durability, never the live answer
                log.exception("could not store events of %s/%s", run.session_id, run.id)
            if ending is not None:
                self._ended(run, ending)
            run.mark_saved(upto)

    def _ended(self, run: RequestRun, ending: Ending) -> None:
        log.info("request %s (%s) after %d events", ending.state, ending.finish, len(run.frames))
        asyncio.get_running_loop().call_later(
            self.linger_s, self.live.pop, (run.session_id, run.id), None)
        if ending.state == "done" and not self.closing:
            self._heads_waiting.pop(run.session_id, None)
            self._heads_waiting[run.session_id] = None
            while len(self._heads_waiting) > MAX_HEADS_WAITING:
                self._heads_waiting.popitem(last=False)
        # Started before the `done` is released, so a follow-up finds its head being read.
        self._prefill_when_idle()

    def _prefill_when_idle(self) -> None:
        llm_idle = all(run.finished for run in self.live.values())
        if self.closing or not llm_idle or not self._heads_waiting or (
                self._prefilling and not self._prefilling.done()):
            return
        # The newest first: stale sessions must not hold up the one just answered.
        session_id = next(reversed(self._heads_waiting))
        self._idle_cancel.clear()
        self._prefilling_session = session_id
        self._prefilling = asyncio.create_task(self._prefill(session_id))

    async def _prefill(self, session_id: str) -> None:
        try:
            history = await self.store.read(
                lambda db: sessions.turns(db, session_id, None, HISTORY_TURNS))
            await self.answers.prefill(history, session_id, self._idle_cancel)
            if not self._idle_cancel.is_set():
                self._heads_waiting.pop(session_id, None)
        except Exception:  # idle-time work: a failure costs only the speed-up
            log.exception("pre-reading the next prompt of session %s failed", session_id)
            self._heads_waiting.pop(session_id, None)
        finally:
            self._prefilling_session = None
            self._prefilling = None
        self._prefill_when_idle()  # the next waiting head, if still idle

    def status(self) -> dict[str, Any]:
        """What the LLM is doing now, for operators and for tests that wait for idle time."""
        answering = any(run.stage == "running" and not run.finished
                        for run in self.live.values())
        prefilling = self._prefilling is not None and not self._prefilling.done()
        return {"llm": "answering" if answering else "pre-reading" if prefilling else "idle",
                "queued": self.queue.waiting, "heads_waiting": len(self._heads_waiting)}

    @staticmethod
    def _interrupted(run: RequestRun) -> dict[str, Any]:
        # Shutdown only: decoding the log once here beats keeping every event twice.
        events = [json.loads(frame) for frame in run.frames]
        text = "".join(e.get("text", "") for e in events if e["type"] == "delta")
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
        await asyncio.gather(*(r.saver for r in runs if r.saver), return_exceptions=True)
