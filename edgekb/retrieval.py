"""Question -> the stored chunks most likely to answer it."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass

from .embed import Embedder
from .index import VectorIndex
from .store import AsyncStore, ChunkHit


@dataclass(frozen=True)
class ScoredHit:
    hit: ChunkHit
    score: float


class Retriever:
    def __init__(self, store: AsyncStore, embedder: Embedder, index: VectorIndex,
                 pool: Executor) -> None:
        self.store = store
        self.embedder = embedder
        self.index = index
        self.pool = pool

    async def search(self, query: str, k: int) -> list[ScoredHit]:
        loop = asyncio.get_running_loop()
        matches = await loop.run_in_executor(self.pool, self._vector_search, query, k)
        hits = await self.store.read(lambda s: s.chunks([chunk_id for chunk_id, _ in matches]))
        # A chunk deleted between the index search and the read is simply skipped.
        return [ScoredHit(hits[i], score) for i, score in matches if i in hits]

    def _vector_search(self, query: str, k: int) -> list[tuple[int, float]]:
        return self.index.search(self.embedder.embed(query), k)
