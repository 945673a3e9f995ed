"""Idle-time work for the LLM: pre-reading the next prompt head of sessions just answered.

After an answer, the session's next prompt will likely start with the same instruction, the same
sources (carryover.py) and the turns, answer included; the LLM reads that head while nobody
waits, so a follow-up reads little more than its question.
Any other session's question interrupts this at once (it resumes at the next idle moment); the
same session's question does not, because the head is the start of its own prompt.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

from .sessions import Turn

log = logging.getLogger(__name__)

MAX_HEADS_WAITING = 8  # sessions whose next prompt head waits to be pre-read when idle

LoadTurns = Callable[[str], Awaitable[Sequence[Turn]]]
Prefill = Callable[[Sequence[Turn], str, threading.Event], Awaitable[int]]


class HeadReader:
    def __init__(self, load_turns: LoadTurns, prefill: Prefill,
                 llm_idle: Callable[[], bool]) -> None:
        self._load_turns = load_turns
        self._prefill = prefill
        self._llm_idle = llm_idle
        self._waiting: OrderedDict[str, None] = OrderedDict()
        self._cancel = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: str | None = None
        self.closing = False

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def question_for(self, session_id: str) -> None:
        """A question arrives: stop idle work unless it is for this very session."""
        if self._session != session_id:
            self._cancel.set()
        self._waiting.pop(session_id, None)

    def answered(self, session_id: str) -> None:
        """The session got an answer: its next head waits to be read (newest first)."""
        if self.closing:
            return
        self._waiting.pop(session_id, None)
        self._waiting[session_id] = None
        while len(self._waiting) > MAX_HEADS_WAITING:
            self._waiting.popitem(last=False)

    def start_if_idle(self) -> None:
        if self.closing or not self._waiting or self.busy or not self._llm_idle():
            return
        # The newest first: stale sessions must not hold up the one just answered.
        session_id = next(reversed(self._waiting))
        self._cancel.clear()
        self._session = session_id
        self._task = asyncio.create_task(self._read(session_id))

    async def _read(self, session_id: str) -> None:
        try:
            await self._prefill(await self._load_turns(session_id), session_id, self._cancel)
            if not self._cancel.is_set():
                self._waiting.pop(session_id, None)
        except Exception:  # idle-time work: a failure costs only the speed-up
            log.exception("pre-reading the next prompt of session %s failed", session_id)
            self._waiting.pop(session_id, None)
        finally:
            self._session = None
            self._task = None
        self.start_if_idle()  # the next waiting head, if still idle

    async def close(self) -> None:
        self.closing = True
        self._cancel.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
