"""The answer pipeline: retrieve -> prompt -> generate, as a stream of protocol events.

Events here carry no request id or seq: the transport's request stream numbers them.
Deltas come coalesced from the LLM engine: every token produced within one flush interval
arrives as one Piece and goes out as one event.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from .llm import Finished, GenerationRequest, LlmEngine, Piece, Reading
from .llm_remote import RemoteLlm
from .prompt import PromptBuilder, cite_where
from .retrieval import ScoredHit, Searcher
from .sessions import Turn
from .store import AsyncStore

SNIPPET_CHARS = 240


@dataclass(frozen=True)
class AnswerOptions:
    k: int
    max_tokens: int
    temperature: float
    kbs: tuple[str, ...] | None = None   # None: every knowledge base


def source_entry(number: int, scored: ScoredHit) -> dict[str, Any]:
    hit = scored.hit
    snippet = hit.text if len(hit.text) <= SNIPPET_CHARS else hit.text[:SNIPPET_CHARS] + "…"
    return {"n": number, "doc": hit.doc_path.rsplit("/", 1)[-1], "title": hit.title,
            "where": cite_where(hit), "page": hit.page, "snippet": snippet,
            "score": round(scored.score, 4)}


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
        merged.append(ScoredHit(replace(best.hit, text="\n".join(lines)), best.score))
    return sorted(merged, key=lambda s: -s.score)


class AnswerEngine:
    def __init__(self, store: AsyncStore, searcher: Searcher, prompts: PromptBuilder,
                 llm: LlmEngine | RemoteLlm) -> None:
        self.store = store
        self.searcher = searcher
        self.prompts = prompts
        self.llm = llm
        # Questions are embedded here, one at a time (onnxruntime uses both cores itself), so
        # an embedding waiting for its turn on the cores (cpugate.py) holds no SQLite reader.
        self._embedding = ThreadPoolExecutor(1, thread_name_prefix="embed")

    def close(self) -> None:
        self._embedding.shutdown(wait=True, cancel_futures=True)

    async def answer(self, question: str, options: AnswerOptions, cancel: threading.Event,
                     history: Sequence[Turn] = (), cache_key: str | None = None
                     ) -> AsyncIterator[dict[str, Any]]:
        """Events of one answer; setting ``cancel`` stops generation within one token.

        ``history`` is the session's earlier turns; ``cache_key`` names whose KV state to keep.
        """
        started = time.perf_counter()
        yield {"type": "status", "stage": "retrieving"}
        loop = asyncio.get_running_loop()
        vector = await loop.run_in_executor(self._embedding, self.searcher.embedder.embed,
                                            question)
        hits = merge_neighbours(await self.store.read(
            lambda db: self.searcher.search(db, question, options.k, options.kbs,
                                            vector=vector)))
        retrieval_ms = (time.perf_counter() - started) * 1000
        # Token counting runs llama's tokenizer: keep it off the loop.
        prompt = await loop.run_in_executor(
            None, self.prompts.build, question, [s.hit for s in hits], history)
        used = hits[: prompt.sources_used]
        yield {"type": "sources", "sources": [source_entry(i + 1, s) for i, s in enumerate(used)]}
        generation = GenerationRequest(prompt.text, options.max_tokens, options.temperature,
                                       prompt.stop, cancel, cache_key)
        text: list[str] = []
        first_token_at: float | None = None
        # Each Piece is already coalesced (one per flush interval, by the engine): one delta.
        async for item in self.llm.stream(generation):
            if isinstance(item, Reading):
                if item.total and item.done < item.total:
                    yield {"type": "status", "stage": "reading",
                           "progress": round(item.done / item.total, 3)}
            elif isinstance(item, Piece):
                chunk = item.text if text else item.text.lstrip()  # starts at visible text
                if not chunk:
                    continue
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                    yield {"type": "status", "stage": "generating"}
                text.append(chunk)
                yield {"type": "delta", "text": chunk}
            elif isinstance(item, Finished):
                yield self._done(item, "".join(text), started, retrieval_ms, first_token_at)

    async def prefill(self, history: Sequence[Turn], cache_key: str,
                      cancel: threading.Event) -> int:
        """Pre-read the head of this conversation's next prompt (instruction and turns) while
        the LLM is idle, so a follow-up reads only its sources and question."""
        if not isinstance(self.llm, LlmEngine):
            return 0  # a remote server keeps its own cache
        head = await asyncio.get_running_loop().run_in_executor(None, self.prompts.head, history)
        return await self.llm.prefill(head, cache_key, cancel)

    @staticmethod
    def _done(result: Finished, text: str, started: float, retrieval_ms: float,
              first_token_at: float | None) -> dict[str, Any]:
        total_ms = (time.perf_counter() - started) * 1000
        seconds = result.generation_ms / 1000
        return {
            "type": "done", "finish": result.finish, "text": text,
            "usage": {"prompt_tokens": result.prompt_tokens,
                      "cached_prompt_tokens": result.cached_tokens,
                      "completion_tokens": result.completion_tokens},
            "timings": {
                "retrieval_ms": round(retrieval_ms, 1),
                "prompt_ms": round(result.prompt_ms, 1),
                "ttft_ms": round((first_token_at - started) * 1000, 1) if first_token_at else None,
                "total_ms": round(total_ms, 1),
                "tokens_per_s": round(result.completion_tokens / seconds, 1) if seconds else None,
            },
        }
