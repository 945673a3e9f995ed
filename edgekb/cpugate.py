"""LLM decode steps and embedding runs take turns on the cores instead of competing.

llama.cpp's threads spin while they work: with another busy thread on a 2-core board one
decode step took several times longer (design.md: one busy core dropped decode from 61 to 23
tokens/s). So an embedding run (a question's retrieval, or an ingest batch) waits for the decode
step in progress, and the next step waits for the run. Turns go in arrival order, so neither
side starves the other: a question's embedding costs the answers being written one pause of a
few milliseconds, and an ingest alternates its runs with decode steps.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

DECODE, EMBED = "decode", "embed"


class CpuGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: deque[tuple[str, object]] = deque()  # arrival order
        self._decoding = False
        self._embedding = 0   # embedding runs in progress (they may overlap each other)

    @contextmanager
    def decode_step(self) -> Iterator[None]:
        with self._turn(DECODE):
            yield

    @contextmanager
    def embedding(self) -> Iterator[None]:
        with self._turn(EMBED):
            yield

    @contextmanager
    def _turn(self, kind: str) -> Iterator[None]:
        ticket = (kind, object())
        with self._cond:
            self._waiting.append(ticket)
            while not self._may_start(ticket):
                self._cond.wait()
            self._waiting.remove(ticket)
            if kind == DECODE:
                self._decoding = True
            else:
                self._embedding += 1
        try:
            yield
        finally:
            with self._cond:
                if kind == DECODE:
                    self._decoding = False
                else:
                    self._embedding -= 1
                self._cond.notify_all()

    def _may_start(self, ticket: tuple[str, object]) -> bool:
        if self._decoding:
            return False
        ahead = []
        for waiting in self._waiting:
            if waiting is ticket:
                break
            ahead.append(waiting[0])
        if ticket[0] == DECODE:
            return not self._embedding and not ahead
        return DECODE not in ahead  # embeddings that arrive together run together
