"""The conversation core: one transport-free API for every way in (WebSocket, SSE, OpenAI).

``open`` a session, ``ask`` in it, ``follow`` a request's events from any seq, ``cancel`` it,
read its ``history``. A transport turns frames into these calls and hands ``follow`` a ``send``
callable; it never touches the store or the engines. Everything a session owns is read and
written here (through sessions.py), so every transport gets the same guarantees:

- session ids are issued by the server: an unknown id, or one of another user, opens a new
  session with a new id;
- a refused question (queue full, disk under its floor, server going down) leaves no trace;
- a request runs as its own task, independent of any connection, and its events are released
  only once stored (runs.py); when nobody has followed it for the grace time it is cancelled
  (one timer per run, cancelled whenever someone follows again);
- only answered turns (finish stop or length) go into later prompts;
- `typing` lookups (hints.py) run only while no answer is queued or running.

Per request, ``RequestOptions`` lets a transport say what its clients mean: answer without
retrieval, answer on a conversation the client holds itself (OpenAI's ``messages``), or keep
answering with nobody following (OpenAI's ``background``).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import events, logs, sessions
from .answer import AnswerEnd, AnswerOptions, Answers
from .audit import AuditLog
from .errors import (
    Busy,
    DiskFull,
    EdgekbError,
    Interrupted,
    NotFound,
    ProtocolError,
    StorageError,
)
from .hints import Hints, Offer
from .idle import HeadReader
from .limits import QuestionRate
from .metrics import Metrics
from .protocol import ID_REUSE, INVALID_FIELD, UNKNOWN_REQUEST, valid_session_id
from .runs import LogWriter, RequestOptions, RequestRun, Send
from .scheduler import FairQueue, Ticket
from .sessions import Ending, SessionInfo, Turn
from .store import AsyncStore

log = logging.getLogger(__name__)

REPLAY_PAGE = 256
HISTORY_TURNS = 6        # most recent answered turns offered to the prompt (it keeps what fits)
DISK_CHECK_EVERY_S = 1.0  # free space is read at most this often
# Sessions handed out but not yet stored (a session row is written with its first question):
# a second tab may open one before anything was asked. Bounded; the oldest are forgotten.
MAX_ISSUED_SESSIONS = 4096
MAX_LISTED_SESSIONS = 200  # a user's conversations listed at most (the newest)
MAX_TITLE_CHARS = 120
STOP_WAIT_S = 10.0         # deleting a conversation waits this long for its answers to end


@dataclass(frozen=True)
class RequestState:
    state: str          # running, done, cancelled, failed, interrupted
    last_seq: int       # the highest seq stored so far
    created_at: float   # when it was asked (Unix time)


@dataclass(frozen=True)
class Opened:
    session: str
    resumed: bool                     # the session existed (and is this user's)
    running: list[dict[str, Any]]     # its unfinished requests: {"id", "seq"}


class Conversations:
    def __init__(self, store: AsyncStore, answers: Answers, queue: FairQueue,
                 options: AnswerOptions, grace_s: float, *, data_dir: Path,
                 min_free_bytes: int, linger_s: float = 30.0,
                 metrics: Metrics | None = None,
                 question_rate: QuestionRate | None = None,
                 audit: AuditLog | None = None) -> None:
        self.store = store
        # One question budget per user, whatever transport the question came by.
        self.question_rate = question_rate
        self.audit = audit
        self.answers = answers
        self.queue = queue
        self.options = options
        self.grace_s = grace_s
        self.linger_s = linger_s
        self.data_dir = data_dir
        self.min_free_bytes = min_free_bytes
        self.live: dict[tuple[str, str], RequestRun] = {}
        self.metrics = metrics or Metrics()
        self.closing = False
        self._writer = LogWriter(store, self._ended)
        self._heads = HeadReader(self._answered_turns, answers.prefill, self._llm_idle)
        self._hints = Hints(lambda text, kbs: answers.lookup(text, replace(options, kbs=kbs)),
                            self._llm_idle)
        self._free_bytes: tuple[float, int] | None = None  # (checked at, bytes)
        self._issued: OrderedDict[str, str] = OrderedDict()  # session -> user, not yet stored
        self._deleting: set[str] = set()  # sessions being deleted take no new question

    # --- the API ---------------------------------------------------------------------------

    async def open(self, user: str, requested: str | None = None) -> Opened:
        """Continue ``requested`` when it is this user's session, else start a new one."""
        if requested and valid_session_id(requested):
            owner = await self.store.read(lambda db: sessions.session_owner(db, requested))
            if owner == user:
                return Opened(requested, True, self.running(requested))
            if owner is None and self._issued.get(requested) == user:
                return Opened(requested, False, [])
        session = sessions.new_session_id()
        self._issued[session] = user
        while len(self._issued) > MAX_ISSUED_SESSIONS:
            self._issued.popitem(last=False)
        return Opened(session, False, [])

    async def ask(self, session_id: str, user: str, request_id: str, question: str,
                  kbs: tuple[str, ...] | None = None,
                  options: RequestOptions = RequestOptions(), *, address: str = "") -> None:
        """Start answering; the events are read with ``follow``. A refused question raises a
        typed error that names the request, and leaves nothing stored (the audit trail
        records it). ``address``: the client's, for the audit trail."""
        try:
            if self.question_rate is not None:
                self.question_rate.take(user)  # raises RateLimited with retry_after
            await self._start(session_id, user, request_id, question, kbs, options)
        except EdgekbError as exc:
            exc.details.setdefault("id", request_id)
            self.metrics.refused(exc.code)
            self._audit("question", user, address, session_id, request_id, exc.code, question)
            raise
        self._audit("question", user, address, session_id, request_id, "ok", question)

    def _audit(self, event: str, user: str, address: str, session_id: str, request_id: str,
               outcome: str, question: str = "") -> None:
        if self.audit is None:
            return
        # A client hammering while refused costs a line or two a second, with exact counts.
        self.audit.record(event, user=user, address=address, request=request_id,
                          outcome=outcome, session=session_id,
                          chars=len(question) if question else None,
                          question=question or None,
                          coalesce=None if outcome == "ok" else f"{event}:{user}:{outcome}")

    async def _start(self, session_id: str, user: str, request_id: str, question: str,
                     kbs: tuple[str, ...] | None, options: RequestOptions) -> None:
        if self.closing:
            raise Busy("the server is going down; ask again in a moment", retry_after=10)
        self._check_disk()
        key = (session_id, request_id)
        if key in self.live:
            raise _id_reuse(request_id)
        if kbs:
            await self._check_kbs(kbs)
        if session_id in self._deleting:
            raise _no_session(session_id)
        run = RequestRun(session_id, request_id, user, question, kbs, options)
        ticket = self.queue.enqueue(user, lambda p: run.append(
            events.queued(p, self.queue.wait_s(p) if p else None)))
        self._heads.question_for(session_id)
        try:
            fresh = await self.store.write(lambda db: sessions.begin_request(
                db, session_id, user, request_id, question))
        except EdgekbError:
            self.queue.withdraw(ticket)
            raise
        except Exception as exc:
            self.queue.withdraw(ticket)
            log.error("could not store a question of session %s: %s", session_id, exc)
            raise StorageError("the appliance could not store the question (is its disk "
                               "full?)") from exc
        if not fresh:
            self.queue.withdraw(ticket)
            raise _id_reuse(request_id)
        self.live[key] = run
        # Both tasks inherit the request id: it is on every log line they write.
        token = logs.request_id.set(f"{session_id}/{request_id}")
        try:
            run.saver = asyncio.create_task(self._writer.run(run))
            run.task = asyncio.create_task(self._produce(run, ticket))
        finally:
            logs.request_id.reset(token)
        self._unfollowed(run)  # cancelled unless someone follows it

    async def cancel(self, session_id: str, request_id: str, *, user: str = "",
                     address: str = "") -> None:
        """Stop a request within one token. Cancelling one that already ended does nothing
        (its last event says how it ended); an id this session never used is a typed error."""
        run = self.live.get((session_id, request_id))
        if run is None:
            if await self._state(session_id, request_id) is None:
                self._audit("cancel", user, address, session_id, request_id, UNKNOWN_REQUEST)
                raise _unknown(request_id)
            self._audit("cancel", user, address, session_id, request_id, "already_ended")
            return
        self._audit("cancel", user, address, session_id, request_id, "ok")
        self._stop(run)

    async def follow(self, session_id: str, request_id: str, after: int, send: Send, *,
                     live: bool = True) -> None:
        """Send every saved event of the request with seq > after, live ones as they come;
        returns once the last one is sent (``live`` False: once the saved ones are)."""
        run = self.live.get((session_id, request_id))
        if run is None:
            await self._replay_stored(session_id, request_id, after, send, live)
            return
        if not live:
            await run.follow(after, send, live=False)
            return
        # The asker's own first follow is not a resume; every later one is.
        self.metrics.followed(resume=run.follows > 0, replayed=max(0, run.saved - after))
        run.follows += 1
        run.followers += 1
        if run.grace is not None:
            run.grace.cancel()
            run.grace = None
        try:
            await run.follow(after, send)
        finally:
            run.followers -= 1
            self._unfollowed(run)

    async def history(self, session_id: str, before: int | None,
                      limit: int) -> tuple[list[Turn], bool]:
        """Up to ``limit`` turns before turn ``before``, oldest first, and whether there are
        older ones."""
        turns = await self.store.read(lambda db: sessions.turns(db, session_id, before,
                                                                limit + 1))
        return turns[-limit:], len(turns) > limit

    async def state(self, session_id: str, user: str, request_id: str) -> RequestState | None:
        """Where a request of one of this user's sessions stands; None when the session is not
        theirs or the request unknown (the two are not told apart)."""
        run = self.live.get((session_id, request_id))
        if run is not None:
            if run.user != user:
                return None
            return RequestState(run.ending.state if run.ending and run.complete else "running",
                                run.saved, run.created_at)
        owner = await self.store.read(lambda db: sessions.session_owner(db, session_id))
        found = await self._state(session_id, request_id) if owner == user else None
        return RequestState(*found) if found else None

    def typing(self, key: Hashable, text: str, kbs: tuple[str, ...] | None,
               offer: Offer) -> None:
        """A partial question of connection ``key``: looked up when the LLM rests, the hint
        handed to ``offer``. Replaces the connection's earlier text if not yet looked up."""
        if not self.closing:
            self._hints.typing(key, text, kbs, offer)

    def gone(self, key: Hashable) -> None:
        """Connection ``key`` closed: its text waiting for a lookup is forgotten."""
        self._hints.forget(key)

    # --- a user's conversations ------------------------------------------------------------

    async def sessions(self, user: str) -> list[SessionInfo]:
        """The user's conversations, the most recently active first."""
        return await self.store.read(lambda db: sessions.user_sessions(
            db, user, MAX_LISTED_SESSIONS))

    async def session(self, user: str, session_id: str
                      ) -> tuple[SessionInfo, list[dict[str, Any]]]:
        """One of the user's conversations and its unfinished requests with their questions
        (a page that follows them after a reload, or from another device, shows those)."""
        info = await self._own(user, session_id)
        running = [{"id": run.id, "seq": run.saved, "question": run.question}
                   for (sid, _), run in self.live.items()
                   if sid == session_id and not run.finished]
        return info, running

    async def rename(self, user: str, session_id: str, title: str | None) -> SessionInfo:
        """Name the user's conversation; an empty title shows its first question again."""
        cleaned = " ".join("".join(c for c in title or "" if c.isprintable()).split())
        if len(cleaned) > MAX_TITLE_CHARS:
            raise ProtocolError(INVALID_FIELD, f"title: at most {MAX_TITLE_CHARS} characters",
                                field="title")
        await self._own(user, session_id)
        if not await self.store.write(lambda db: sessions.rename_session(
                db, user, session_id, cleaned or None)):
            raise _no_session(session_id)
        return await self._own(user, session_id)

    async def delete(self, user: str, session_id: str) -> None:
        """Forget the user's conversation: its running answers are stopped first (their
        followers get their end), then its requests, logs and turns are deleted."""
        await self._own(user, session_id)
        self._deleting.add(session_id)
        try:
            runs = [run for (sid, _), run in self.live.items() if sid == session_id]
            for run in runs:
                self._stop(run)
            savers = [run.saver for run in runs if run.saver is not None]
            if savers:
                await asyncio.wait(savers, timeout=STOP_WAIT_S)
            if not await self.store.write(lambda db: sessions.delete_session(db, user,
                                                                             session_id)):
                raise _no_session(session_id)
        finally:
            self._deleting.discard(session_id)
        self._issued.pop(session_id, None)
        for run in runs:
            self.live.pop((run.session_id, run.id), None)

    async def _own(self, user: str, session_id: str) -> SessionInfo:
        info = await self.store.read(lambda db: sessions.user_session(db, user, session_id))
        if info is None:
            raise _no_session(session_id)
        return info

    def running(self, session_id: str) -> list[dict[str, Any]]:
        return [{"id": run.id, "seq": run.saved} for (sid, _), run in self.live.items()
                if sid == session_id and not run.finished]

    def status(self) -> dict[str, Any]:
        """What the LLM is doing now, for operators and for tests that wait for idle time."""
        answering = any(run.stage == "running" and not run.finished
                        for run in self.live.values())
        return {"llm": "answering" if answering else "pre-reading" if self._heads.busy
                else "idle", "queued": self.queue.waiting, "heads_waiting": self._heads.waiting,
                "storage": self.storage()}

    def storage(self) -> dict[str, Any]:
        free = self._free()
        return {"free_mb": round(free / 2**20, 1), "floor_mb": round(self.min_free_bytes / 2**20),
                "ok": free >= self.min_free_bytes}

    async def close(self) -> None:
        """Shutdown: end running requests with an `interrupted` error; their logs stay
        resumable after the restart."""
        self.closing = True
        await self._heads.close()
        await self._hints.close()
        runs = [r for r in self.live.values() if r.task and not r.task.done()]
        for run in runs:
            run.task.cancel()  # type: ignore[union-attr]
        await asyncio.gather(*(r.task for r in runs if r.task), return_exceptions=True)
        await asyncio.gather(*(r.saver for r in runs if r.saver), return_exceptions=True)

    # --- inside ----------------------------------------------------------------------------

    def _free(self) -> int:
        now = time.monotonic()
        if self._free_bytes is None or now - self._free_bytes[0] > DISK_CHECK_EVERY_S:
            self._free_bytes = (now, shutil.disk_usage(self.data_dir).free)
        return self._free_bytes[1]

    def _check_disk(self) -> None:
        free = self._free()
        if free < self.min_free_bytes:
            raise DiskFull(f"only {free / 2**20:.0f} MB free on the data disk (the floor is "
                           f"{self.min_free_bytes / 2**20:.0f} MB); ask an admin to make room",
                           retry_after=60)

    async def _check_kbs(self, kbs: tuple[str, ...]) -> None:
        known = set(await self.store.read(lambda db: db.kbs()))
        missing = [kb for kb in kbs if kb not in known]
        if missing:
            raise NotFound(f"no knowledge base {missing[0]!r} (this appliance holds "
                           f"{', '.join(sorted(known)) or 'none'})", field="kbs")

    async def _state(self, session_id: str, request_id: str) -> tuple[str, int, float] | None:
        return await self.store.read(lambda db: sessions.request_state(db, session_id,
                                                                       request_id))

    async def _answered_turns(self, session_id: str) -> Sequence[Turn]:
        return await self.store.read(lambda db: sessions.turns(
            db, session_id, None, HISTORY_TURNS, finished_only=True))

    def _llm_idle(self) -> bool:
        return all(run.finished for run in self.live.values())

    def _stop(self, run: RequestRun) -> None:
        if run.finished:
            return
        run.cancel.set()  # generating: stops within one token; new: never queues
        if run.stage == "queued" and run.task is not None:
            run.task.cancel()  # waiting for the LLM: leave the queue now

    def _unfollowed(self, run: RequestRun) -> None:
        if run.options.detached:
            return
        if run.followers == 0 and not run.finished and run.grace is None:
            run.grace = asyncio.get_running_loop().call_later(self.grace_s, self._grace_expired,
                                                              run)

    def _grace_expired(self, run: RequestRun) -> None:
        run.grace = None
        if run.followers == 0 and not run.finished:
            log.info("nobody follows %s/%s any more: cancelling", run.session_id, run.id)
            self._stop(run)

    async def _replay_stored(self, session_id: str, request_id: str, after: int,
                             send: Send, counted: bool) -> None:
        state = await self._state(session_id, request_id)
        if state is None:
            raise _unknown(request_id)
        if counted:
            self.metrics.followed(resume=True, replayed=max(0, state[1] - after))
        cursor = after
        for _ in range(state[1] // REPLAY_PAGE + 2):  # bounded: the log has last_seq events
            page = await self.store.read(lambda db: sessions.frames_after(
                db, session_id, request_id, cursor, REPLAY_PAGE))
            if not page:
                return
            for seq, frame in page:
                await send(frame)
                cursor = seq

    async def _produce(self, run: RequestRun, ticket: Ticket) -> None:
        end: AnswerEnd | None = None
        final: dict[str, Any] | None = None
        sources: list[dict[str, Any]] = []
        try:
            run.stage = "queued"
            if run.cancel.is_set():  # cancelled before its task first ran
                self.queue.withdraw(ticket)
                raise asyncio.CancelledError
            async with self.queue.hold(ticket):
                run.stage = "running"
                await self._hints.quiet()  # a lookup in flight ends before the LLM starts
                held = run.options.conversation
                history = await self._answered_turns(run.session_id) if held is None \
                    else _client_turns(held)
                options = replace(self.options, kbs=run.kbs, retrieval=run.options.retrieval)
                async for item in self.answers.answer(run.question, options, run.cancel,
                                                      history, run.session_id if held is None
                                                      else None):
                    if isinstance(item, AnswerEnd):
                        end = item  # its `done` goes out with the turn, below
                        continue
                    run.append(item)
                    if item["type"] == "source":
                        sources.append({k: v for k, v in item.items() if k != "type"})
            if end is not None:
                final = events.done(end.finish, end.text, end.usage, end.timings)
        except asyncio.CancelledError:
            final = self._interrupted(run) if self.closing else \
                events.done("cancelled", run.text(), {}, {})
        except EdgekbError as exc:
            final = events.error(exc)
        except Exception:
            log.exception("request %s/%s failed", run.session_id, run.id)
            final = events.error(EdgekbError("internal error"))
        if final is None:  # the engine ended without its end: never leave a request open
            final = events.error(EdgekbError("internal error"))
        text = end.text if end is not None else run.text()
        run.finish(final, _ending(run.question, final, text, sources))
        if run.saver is not None:
            await asyncio.shield(run.saver)  # the log is written to its end even at shutdown

    def _ended(self, run: RequestRun, ending: Ending) -> None:
        log.info("request %s (%s) after %d events", ending.state, ending.finish, len(run.frames))
        asyncio.get_running_loop().call_later(
            self.linger_s, self.live.pop, (run.session_id, run.id), None)
        self.metrics.ended(ending.finish, run.frames[-1])
        if ending.state == "done" and not self.closing and run.options.conversation is None:
            self._heads.answered(run.session_id)
        # Started before the last event is released, so a follow-up finds its head being read.
        self._heads.start_if_idle()
        self._hints.llm_free()

    @staticmethod
    def _interrupted(run: RequestRun) -> dict[str, Any]:
        return events.error(Interrupted(
            "the server shut down while this answer was being written", chars=len(run.text())))


def _ending(question: str, final: dict[str, Any], text: str,
            sources: list[dict[str, Any]]) -> Ending:
    if final["type"] == "done":
        finish = final["finish"]
        state = "cancelled" if finish == "cancelled" else "done"
    else:
        finish = final["code"]
        state = "interrupted" if finish == "interrupted" else "failed"
    return Ending(state, question, text, sources, finish)


def _client_turns(pairs: tuple[tuple[str, str], ...]) -> list[Turn]:
    """A conversation the client holds, as turns for the prompt (numbered from 1)."""
    return [Turn(n, "", question, answer, [], "stop", 0.0)
            for n, (question, answer) in enumerate(pairs, start=1)]


def _id_reuse(request_id: str) -> ProtocolError:
    return ProtocolError(ID_REUSE, f"request id {request_id!r} was already used in this"
                         " session; resume it or use a new id", id=request_id)


def _no_session(session_id: str) -> NotFound:
    return NotFound(f"no conversation {session_id!r} of yours")


def _unknown(request_id: str) -> ProtocolError:
    return ProtocolError(UNKNOWN_REQUEST, f"no request {request_id!r} in this session",
                         id=request_id)
