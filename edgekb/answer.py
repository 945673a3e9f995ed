"""The answer pipeline: retrieve -> prompt -> generate, as a stream of protocol events.

Events here carry no request id or seq: the request's log numbers them (runs.py). The stream
ends with an ``AnswerEnd`` that holds the whole text; the conversation core turns it into the
`done` event and the stored turn. Deltas are coalesced: every token produced within one flush
interval goes out in one event (split when it would exceed the event size bound).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from . import events
from .citations import CitationFilter, attribute
from .llm import Finished, GenerationRequest, LlmEngine, Piece, Reading
from .llm_remote import RemoteLlm
from .prompt import PromptBuilder
from .retrieval import ScoredHit, Searcher, needs_translation
from .sessions import Turn
from .sources import not_covered_text, source_entry
from .store import AsyncStore, Store

# Below this relevance (cosine + shares of the question's words and identifiers, see
# retrieval.py) of the best chunk nothing relevant was found. Measured on the three sets:
# questions no manual covers reached 0.26 (upstream) and 0.35 (held out), answerable ones
# started at 0.36 (the project's set), 0.42 and 0.55 (README, Retrieval).
RELEVANCE_FLOOR = 0.35
TRANSLATION_TOKENS = 48


@dataclass(frozen=True)
class AnswerOptions:
    k: int
    max_tokens: int
    temperature: float
    flush_interval_s: float
    kbs: tuple[str, ...] | None = None   # None: every knowledge base


@dataclass(frozen=True)
class AnswerEnd:
    """The last item of an answer stream."""

    finish: str                  # stop | length | cancelled
    text: str
    usage: dict[str, Any]
    timings: dict[str, Any]


AnswerItem = dict[str, Any] | AnswerEnd


class Answers(Protocol):
    """What the conversation core needs of an answer engine (tests script their own)."""

    def answer(self, question: str, options: AnswerOptions, cancel: threading.Event,
               history: Sequence[Turn] = (), cache_key: str | None = None
               ) -> AsyncIterator[AnswerItem]: ...

    async def prefill(self, history: Sequence[Turn], cache_key: str,
                      cancel: threading.Event) -> int: ...


def merge_neighbours(hits: list[ScoredHit]) -> list[ScoredHit]:
    """One source per document section: chunks of the same section are joined in document
    order (their overlap said once) and ranked by their best score, so the reader and the
    prompt get one coherent passage instead of two overlapping halves."""
    groups: dict[tuple[str, str, int | None], list[ScoredHit]] = {}
    for scored in hits:
        hit = scored.hit
        groups.setdefault((hit.doc_path, hit.heading, hit.page), []).append(scored)
    merged = []
    for group in groups.values():
        if len(group) == 1:
            merged.append(group[0])
            continue
        ordered = sorted(group, key=lambda s: s.hit.ord)
        lines: list[str] = []
        for scored in ordered:
            new = scored.hit.text.split("\n")
            overlap = next((n for n in range(min(len(lines), len(new)), 0, -1)
                            if lines[-n:] == new[:n]), 0)
            lines.extend(new[overlap:])
        best = max(group, key=lambda s: s.score)
        merged.append(ScoredHit(replace(best.hit, text="\n".join(lines)), best.score,
                                best.relevance))
    return sorted(merged, key=lambda s: -s.score)


class AnswerEngine:
    def __init__(self, store: AsyncStore, searcher: Searcher, prompts: PromptBuilder,
                 llm: LlmEngine | RemoteLlm) -> None:
        self.store = store
        self.searcher = searcher
        self.prompts = prompts
        self.llm = llm

    async def answer(self, question: str, options: AnswerOptions, cancel: threading.Event,
                     history: Sequence[Turn] = (), cache_key: str | None = None
                     ) -> AsyncIterator[AnswerItem]:
        """Events of one answer; setting ``cancel`` stops generation within one token.

        ``history`` is the session's earlier turns; ``cache_key`` names whose KV state to keep.
        """
        started = time.perf_counter()
        yield events.status("retrieving")
        alternates = (await self._translate(question, cancel),) \
            if needs_translation(question) else ()
        hits = merge_neighbours(await self.store.read(
            lambda db: self.searcher.search(db, question, options.k, options.kbs,
                                            alternates=alternates)))
        retrieval_ms = (time.perf_counter() - started) * 1000
        if not hits or hits[0].relevance < RELEVANCE_FLOOR:
            async for event in self._not_covered(question, options, started, retrieval_ms):
                yield event
            return
        loop = asyncio.get_running_loop()
        # Token counting runs llama's tokenizer: keep it off the loop.
        prompt = await loop.run_in_executor(
            None, self.prompts.build, question, [s.hit for s in hits], history)
        used = hits[: prompt.sources_used]
        for number, scored in enumerate(used, start=1):
            yield events.source(source_entry(number, scored, question))
        generation = GenerationRequest(prompt.text, options.max_tokens, options.temperature,
                                       prompt.stop, cancel, cache_key, **prompt.sampling)
        citations = CitationFilter(len(used))
        text: list[str] = []
        pending: list[str] = []
        first_token_at: float | None = None
        last_flush = 0.0
        async for item in self.llm.stream(generation):
            if isinstance(item, Reading):
                if item.total and item.done < item.total:
                    yield events.status("reading", item.done / item.total)
            elif isinstance(item, Piece):
                item = Piece(citations.feed(item.text))  # "[..." waits until it closes
                if not text and not pending:  # an answer starts at its first visible character
                    item = Piece(item.text.lstrip())
                if not item.text:
                    continue
                now = time.perf_counter()
                if first_token_at is None:
                    first_token_at = now
                    yield events.status("generating")
                pending.append(item.text)
                if now - last_flush >= options.flush_interval_s:
                    chunk = "".join(pending)
                    pending.clear()
                    text.append(chunk)
                    last_flush = now
                    for delta in events.deltas(chunk):
                        yield delta
            elif isinstance(item, Finished):
                pending.append(citations.flush())
                if not citations.kept and item.finish != "cancelled":
                    number = attribute("".join(text + pending), [s.hit.text for s in used])
                    if number is not None:
                        pending.append(f" [{number}]")
                if "".join(pending):
                    chunk = "".join(pending)
                    text.append(chunk)
                    for delta in events.deltas(chunk):
                        yield delta
                yield self._end(item, "".join(text), started, retrieval_ms, first_token_at)

    async def _translate(self, question: str, cancel: threading.Event) -> str:
        """The question in English, by the LLM (the default embedder is English-only, and the
        manuals mostly are too); "" when it cannot be had."""
        prompt = self.prompts.translation(question)
        if prompt is None:
            return ""
        # Its own cancel event: the engine sets a request's event when its stream ends, and
        # this one ends before the answer starts.
        own = threading.Event()
        request = GenerationRequest(prompt.text, TRANSLATION_TOKENS, 0.0, prompt.stop, own,
                                    **prompt.sampling)
        pieces: list[str] = []
        async for item in self.llm.stream(request):
            if cancel.is_set():
                own.set()  # the asker cancelled: stop translating within a token
            if isinstance(item, Piece):
                pieces.append(item.text)
        return " ".join("".join(pieces).split())

    async def _not_covered(self, question: str, options: AnswerOptions, started: float,
                           retrieval_ms: float) -> AsyncIterator[AnswerItem]:
        """No chunk is relevant enough: say so, and which manuals were searched, without the
        LLM (a small model asked anyway makes an answer up)."""
        titles = await self.store.read(lambda db: _searched_titles(db, options.kbs))
        text = not_covered_text(question, titles)
        yield events.status("generating")
        for delta in events.deltas(text):
            yield delta
        first = time.perf_counter()
        yield self._end(Finished("stop", 0, 0, 0, 0.0, 0.0), text, started, retrieval_ms,
                        first)

    async def prefill(self, history: Sequence[Turn], cache_key: str,
                      cancel: threading.Event) -> int:
        """Pre-read the head of this conversation's next prompt (instruction and turns) while
        the LLM is idle, so a follow-up reads only its sources and question."""
        if not isinstance(self.llm, LlmEngine):
            return 0  # a remote server keeps its own cache
        head = await asyncio.get_running_loop().run_in_executor(None, self.prompts.head, history)
        return await self.llm.prefill(head, cache_key, cancel)

    @staticmethod
    def _end(result: Finished, text: str, started: float, retrieval_ms: float,
             first_token_at: float | None) -> AnswerEnd:
        total_ms = (time.perf_counter() - started) * 1000
        seconds = result.generation_ms / 1000
        return AnswerEnd(
            result.finish, text,
            usage={"prompt_tokens": result.prompt_tokens,
                   "cached_prompt_tokens": result.cached_tokens,
                   "completion_tokens": result.completion_tokens},
            timings={
                "retrieval_ms": round(retrieval_ms, 1),
                "prompt_ms": round(result.prompt_ms, 1),
                "ttft_ms": round((first_token_at - started) * 1000, 1) if first_token_at else None,
                "total_ms": round(total_ms, 1),
                "tokens_per_s": round(result.completion_tokens / seconds, 1) if seconds else None,
            })


def _searched_titles(store: Store, kbs: Sequence[str] | None) -> list[str]:
    names = kbs if kbs is not None else store.kbs()
    return [doc.title for kb in names for doc in store.documents(kb)]
