"""A scripted answer engine for fast in-process tests of the conversation core and transports.

It stands in for retrieval and the LLM (what those tests are not about): each answer is a list
of pieces, optionally held at a gate the test opens, so races (grace time, resume during an
answer, a write failure, shutdown) happen exactly when the test says. It records the history
each answer was given, so tests can check what a prompt would have been built from.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgekb import events
from edgekb.answer import AnswerEnd, AnswerItem, AnswerOptions
from edgekb.sessions import Turn


@dataclass
class Script:
    pieces: list[str] = field(default_factory=lambda: ["Close", " the", " discharge", " valve",
                                                       "."])
    sources: int = 1
    hold_after: int | None = None   # pieces sent before waiting at the engine's gate
    snippet: str = "Close the discharge valve, then press RESET."
    see_also: bool = False          # a `see_also` hint after the last piece


class ScriptedAnswers:
    def __init__(self) -> None:
        self.default = Script()
        self.scripts: dict[str, Script] = {}    # by question
        self.gate = asyncio.Event()            # opened by the test to let held answers go on
        self.histories: dict[str, list[str]] = {}  # question -> earlier questions it was given
        self.started: list[str] = []
        self.options: dict[str, AnswerOptions] = {}  # question -> the options it was given
        self.lookups: list[str] = []            # texts looked up for `typing` hints
        self.lookup_gate: asyncio.Event | None = None  # when set by a test: lookups wait on it
        self.generating = 0                     # answers between their first and last piece
        self.looking = 0                        # lookups in flight
        self.overlaps = 0                       # times a lookup and a decode ran at once

    def script(self, question: str, **fields: Any) -> Script:
        self.scripts[question] = Script(**fields)
        return self.scripts[question]

    async def answer(self, question: str, options: AnswerOptions, cancel: threading.Event,
                     history: Sequence[Turn] = (), cache_key: str | None = None
                     ) -> AsyncIterator[AnswerItem]:
        script = self.scripts.get(question, self.default)
        self.started.append(question)
        self.histories[question] = [turn.question for turn in history]
        self.options[question] = options
        if options.retrieval:
            yield events.status("retrieving")
        for n in range(1, script.sources + 1 if options.retrieval else 1):
            yield events.source({"n": n, "doc": "pump-manual.md", "title": "P-200 manual",
                                 "where": "Troubleshooting", "page": None,
                                 "snippet": script.snippet, "relevance": "high", "score": 0.9})
        yield events.status("generating")
        self.generating += 1
        self.overlaps += self.looking > 0
        try:
            async for item in self._pieces(script, cancel):
                yield item
        finally:
            self.generating -= 1

    async def _pieces(self, script: Script, cancel: threading.Event
                      ) -> AsyncIterator[AnswerItem]:
        text = ""
        for index, piece in enumerate(script.pieces):
            if script.hold_after is not None and index == script.hold_after:
                while not self.gate.is_set() and not cancel.is_set():
                    await asyncio.sleep(0.005)  # bounded by the test's own timeout
            if cancel.is_set():
                yield AnswerEnd("cancelled", text, {"completion_tokens": index}, {})
                return
            text += piece
            for event in events.deltas(piece):
                yield event
            await asyncio.sleep(0)
        if script.see_also:
            yield events.hint("see_also", [{"doc": "pump-manual.md", "title": "P-200 manual",
                                            "where": "Maintenance intervals", "page": None}])
        yield AnswerEnd("stop", text, {"completion_tokens": len(script.pieces)}, {})

    async def lookup(self, text: str, options: AnswerOptions) -> list[dict[str, Any]]:
        """Retrieval for a hint; it records whether an answer was generating meanwhile."""
        self.lookups.append(text)
        self.looking += 1
        self.overlaps += self.generating > 0
        try:
            if self.lookup_gate is not None:
                await self.lookup_gate.wait()
        finally:
            self.looking -= 1
        return [{"n": 1, "doc": "pump-manual.md", "title": "P-200 manual",
                 "where": f"Troubleshooting ({text[:20]})", "page": None, "snippet": "…",
                 "score": 0.9}]

    async def prefill(self, history: Sequence[Turn], cache_key: str,
                      cancel: threading.Event) -> int:
        return 0
