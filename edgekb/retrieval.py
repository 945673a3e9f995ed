"""Question -> the stored chunks most likely to answer it: vectors, keywords, or both.

Hybrid search takes the top candidates of hnswlib (meaning) and of SQLite FTS5 BM25 (exact words:
`session.timeout.ms`, `E-204`), then re-ranks the union by one score: the cosine similarity of
every candidate (keyword-only ones included, from their stored vectors) plus a bonus for the share
of the question's terms the chunk contains, and a larger one for identifiers (words with digits,
dots or dashes) it contains verbatim. Plain rank fusion of two lists that rarely agree added
nothing at top 3 on real manuals; scoring the union on both signals does.
Blocking: the server runs it on a reader thread.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .embed import Embedder
from .index import Library
from .store import ChunkHit, Store

MODES = ("hybrid", "vector", "keyword")
CANDIDATES = 20
TERM_WEIGHT = 0.25
IDENTIFIER_WEIGHT = 0.3

_WORD = re.compile(r"[\w][\w.\-/]*[\w]|[\w]")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]+")
_IDENTIFIER = re.compile(r"(?=.*[\d._\-/])[\w.\-/]{3,}")
STOPWORDS = frozenset("""a an and are as at be by can do does for from how i if in is it my of on
or should the this to what when where which who why will with you your me we our after before
there their then than that these those into about""".split())


@dataclass(frozen=True)
class ScoredHit:
    hit: ChunkHit
    score: float


def query_terms(query: str) -> list[str]:
    seen: dict[str, None] = {}
    for word in _WORD.findall(query.lower()):
        word = word.strip(".-/")
        if word and word not in STOPWORDS and not _CJK.search(word):
            seen.setdefault(word, None)
    return list(seen)


def fts_query(terms: Sequence[str]) -> str:
    """Each term a quoted phrase (so `e-204` matches the tokens e, 204 in order), OR-ed."""
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


def trigram_query(query: str) -> str:
    grams = {run[i : i + 3] for run in _CJK.findall(query) for i in range(max(1, len(run) - 2))}
    return " OR ".join(f'"{g}"' for g in sorted(grams) if len(g) == 3)


class Searcher:
    def __init__(self, embedder: Embedder, library: Library) -> None:
        self.embedder = embedder
        self.library = library

    def search(self, store: Store, query: str, k: int, kbs: Sequence[str] | None = None,
               mode: str = "hybrid") -> list[ScoredHit]:
        known = self.library.kbs()
        # Only existing knowledge bases: a name from a client never creates an index.
        kbs = [kb for kb in kbs if kb in known] if kbs is not None else known
        vector = self.embedder.embed(query)
        candidates: dict[int, float] = {}
        keyword_scores: dict[int, float] = {}
        for kb in kbs:
            if mode in ("hybrid", "vector"):
                for chunk_id, score in self.library.get(kb).search(vector, CANDIDATES):
                    candidates[chunk_id] = score
            if mode in ("hybrid", "keyword"):
                keyword_scores.update(self._keyword(store, kb, query))
        if mode == "keyword":
            ranked = sorted(keyword_scores.items(), key=lambda kv: -kv[1])
        else:
            if mode == "hybrid":
                missing = [i for i in keyword_scores if i not in candidates]
                candidates.update(self._cosines(store, missing, vector))
            hits = store.chunks(list(candidates))
            ranked = sorted(((i, self._rerank(query, hits[i], s) if mode == "hybrid" else s)
                             for i, s in candidates.items() if i in hits), key=lambda kv: -kv[1])
        hits = store.chunks([i for i, _ in ranked[:k]])
        return [ScoredHit(hits[i], score) for i, score in ranked[:k] if i in hits]

    def _keyword(self, store: Store, kb: str, query: str) -> list[tuple[int, float]]:
        results: list[tuple[int, float]] = []
        terms = query_terms(query)
        if terms:
            results += store.keyword_search(kb, fts_query(terms), CANDIDATES)
        cjk = trigram_query(query)
        if cjk:
            results += store.keyword_search(kb, cjk, CANDIDATES, trigram=True)
        return results

    @staticmethod
    def _cosines(store: Store, ids: list[int], vector: np.ndarray) -> dict[int, float]:
        return {i: float(v @ vector) for i, v in store.chunk_vectors(ids).items()}

    @staticmethod
    def _rerank(query: str, hit: ChunkHit, cosine: float) -> float:
        haystack = f"{hit.title} {hit.heading} {hit.text}".lower()
        terms = query_terms(query)
        score = cosine
        if terms:
            score += TERM_WEIGHT * sum(t in haystack for t in terms) / len(terms)
        identifiers = [t for t in terms if _IDENTIFIER.fullmatch(t)]
        if identifiers:
            score += IDENTIFIER_WEIGHT * sum(t in haystack for t in identifiers) / len(identifiers)
        cjk_runs = _CJK.findall(query)
        if cjk_runs:
            grams = {r[i : i + 2] for r in cjk_runs for i in range(max(1, len(r) - 1))}
            score += TERM_WEIGHT * sum(g in haystack for g in grams) / len(grams)
        return score
