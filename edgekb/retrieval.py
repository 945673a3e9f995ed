"""Question -> the stored chunks most likely to answer it: vectors, keywords, or both.

Hybrid search takes the top candidates of hnswlib (meaning) and of SQLite FTS5 BM25 (exact words:
`session.timeout.ms`, `E-204`), then re-ranks the union by one score: the cosine similarity of
every candidate (keyword-only ones included, from their stored vectors) plus a bonus for the share
of the question's terms the chunk contains as words (light stemming: valves/valve, stopped/stop,
but press is not compressed), and a larger one for identifiers (words with digits, dots or dashes)
it contains verbatim. Plain rank fusion of two lists that rarely agree added nothing at top 3 on
real manuals; scoring the union on both signals does. For CJK questions the trigram BM25 score
joins too: the default embedder is English-only and cannot rank Chinese text.
scripts/eval_retrieval measures the effect of these weights (tests/data/eval).
Blocking: the server runs it on a reader thread.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np

from .embed import Embedder
from .index import Library
from .store import ChunkHit, Store

MODES = ("hybrid", "vector", "keyword")
CANDIDATES = 20           # from each list; the union is re-ranked
TERM_WEIGHT = 0.3         # x share of the question's terms found as words in the chunk
IDENTIFIER_WEIGHT = 0.3   # x share of its identifiers found verbatim
TRIGRAM_WEIGHT = 0.3      # x trigram BM25 relative to the best match (CJK questions only)
# x BM25 relative to the best keyword match: it weighs rare words (ntpdate, burst) above common
# ones, which the term share cannot. Query-adaptive, as GPT4All's LocalDocs does: a short or
# identifier-bearing question is a keyword query; a long everyday one leans on meaning.
BM25_WEIGHTS = {"identifier": 0.5, "short": 0.4, "long": 0.25}
SHORT_QUERY_TERMS = 3

WORD = re.compile(r"[\w][\w.\-/]*[\w]|[\w]")
_OPTION = re.compile(r"(?<![\w-])--?[A-Za-z][\w-]*")  # -H, -sf, --health: asked in its case
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]+")
_IDENTIFIER = re.compile(r"(?=.*[\d._\-/])[\w.\-/]{3,}")
# Question words that say nothing about the answer; as bonus terms they only add noise.
STOPWORDS = frozenset("""a an and are as at be by can do does for from how i if in is it my of on
or should the this to what when where which who why will with you your me we our after before
there their then than that these those into about has have had not no now its make take get gets
got say says too very also just only cannot could would may might must shall need any all some
each other same such here want one""".split())
_VOWELS = frozenset("aeiouy")
_EDGE = "\"'`*()[]{}<>|,;:!?.-/=+#~"  # punctuation that may enclose a word in a chunk


@dataclass(frozen=True)
class ScoredHit:
    hit: ChunkHit
    score: float            # ranking score (its scale depends on the question)
    relevance: float = 0.0  # how well the chunk matches on its own: cosine, term and
                            # identifier shares (comparable across questions: the floor)


def needs_translation(query: str) -> bool:
    """A CJK question: the default embedder is English-only, so it is also searched in
    English (the answer engine has the LLM translate it)."""
    return bool(CJK.search(query))


def cjk_bigrams(text: str) -> set[str]:
    """The CJK runs of a text as overlapping character pairs (a lone character as itself)."""
    return {run[i : i + 2] for run in CJK.findall(text) for i in range(max(1, len(run) - 1))}


def query_terms(query: str) -> list[str]:
    seen: dict[str, None] = {}
    for word in WORD.findall(query.lower()):
        word = word.strip(".-/")
        if word and word not in STOPWORDS and not CJK.search(word):
            seen.setdefault(word, None)
    return list(seen)


@functools.lru_cache(maxsize=1 << 14)  # a manual's vocabulary repeats: stem each word once
def stem(word: str) -> str:
    """A light English stemmer, applied alike to question terms and chunk words: plurals, -ing
    and -ed meet their base (batteries/battery, stopped/stop, tuning/tune, bearings/bearing)."""
    if len(word) <= 3 or not word.isalpha():
        return word
    if word.endswith("ies"):
        word = word[:-3] + "y"
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix in ("ing", "ed"):
        base = word[: -len(suffix)]
        if (word.endswith(suffix) and not word.endswith("eed") and len(base) >= 3
                and not _VOWELS.isdisjoint(base)):
            if len(base) > 3 and base[-1] == base[-2] and base[-1] not in "lsz":
                base = base[:-1]  # stopped -> stopp -> stop
            word = base
            break
    return word[:-1] if len(word) > 3 and word.endswith("e") else word


def words(text: str) -> set[str]:
    """Stemmed words of a lower-cased text, identifiers (`e-117`, `p0.08`) kept whole.
    str.split, not WORD: it runs on every candidate and the regex costs 3x more."""
    text = text.replace("'", " ").replace("\u2019", " ")  # gateway's -> gateway s, as in queries
    return {stem(w.strip(_EDGE)) for w in set(text.split())}


@functools.lru_cache(maxsize=256)  # the same question is scored against every candidate
def _question(query: str) -> tuple[tuple[str, ...], tuple[str, ...], frozenset[str],
                                   tuple[re.Pattern[str], ...]]:
    """A question's stemmed terms, its identifiers, its CJK bigrams and its command-line
    options. An option ("smartctl -H", "-sf") is matched whole and in its own case: "-H"
    (health) is not "-h" (help), and "-t" is not the t of "-tty"; its bare letter is no term."""
    asked = tuple(dict.fromkeys(_OPTION.findall(query)))
    letters = {o.lstrip("-").lower() for o in asked}
    terms = [t for t in query_terms(query) if t not in letters or len(t) > 2]
    return (tuple(stem(t) for t in terms), tuple(t for t in terms if _IDENTIFIER.fullmatch(t)),
            frozenset(cjk_bigrams(query)),
            tuple(re.compile(r"(?<![\w-])" + re.escape(o) + r"(?![\w-])") for o in asked))


@functools.lru_cache(maxsize=1024)
def _file_words(doc_path: str) -> str:
    """A manual's file name as words: it names the product where the title does not
    ("postgresql-runtime-config-connection" under the title "20.3. Connections and ...")."""
    return re.sub(r"[-_.]+", " ", PurePath(doc_path).stem)


def bm25_weight_for(query: str) -> float:
    stems, identifiers, _, _ = _question(query)
    if identifiers:
        return BM25_WEIGHTS["identifier"]
    return BM25_WEIGHTS["short" if len(stems) <= SHORT_QUERY_TERMS else "long"]


def fts_query(terms: Sequence[str]) -> str:
    """Each term a quoted phrase (so `e-204` matches the tokens e, 204 in order), OR-ed."""
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


def trigram_query(query: str) -> str:
    grams = {run[i : i + 3] for run in CJK.findall(query) for i in range(max(1, len(run) - 2))}
    return " OR ".join(f'"{g}"' for g in sorted(grams) if len(g) == 3)


class Searcher:
    def __init__(self, embedder: Embedder, library: Library) -> None:
        self.embedder = embedder
        self.library = library

    def search(self, store: Store, query: str, k: int, kbs: Sequence[str] | None = None,
               mode: str = "hybrid", alternates: Sequence[str] = (),
               vectors: np.ndarray | None = None) -> list[ScoredHit]:
        """The k best chunks for ``query``; ``alternates`` are the same question in other
        words (an English translation of a Chinese one): their candidates join, and each
        chunk is scored by the variant that matches it best. ``vectors``: the embeddings of
        ``variants(query, alternates)`` when the caller computed them (the server embeds on its
        own executor, so SQLite reads never wait behind an embedding)."""
        known = self.library.kbs()
        # Only existing knowledge bases: a name from a client never creates an index.
        kbs = [kb for kb in kbs if kb in known] if kbs is not None else known
        variants = self.variants(query, alternates)
        if vectors is None:
            vectors = self.embedder.embed_batch(variants)
        candidates: set[int] = set()
        keyword_scores: dict[int, float] = {}
        trigram_scores: dict[int, float] = {}  # relative to the best match of its kb
        for kb in kbs:
            for variant, vector in zip(variants, vectors):
                if mode in ("hybrid", "vector"):
                    candidates.update(i for i, _ in self.library.get(kb).search(vector,
                                                                                CANDIDATES))
                if mode in ("hybrid", "keyword"):
                    terms, trigrams = self._keyword(store, kb, variant)
                    for i, score in terms + trigrams:
                        keyword_scores[i] = max(score, keyword_scores.get(i, 0.0))
                    best = max((score for _, score in trigrams), default=0.0)
                    trigram_scores.update((i, score / best) for i, score in trigrams if best > 0)
        if mode == "hybrid":
            candidates.update(keyword_scores)
            self._score_missing(store, variants, candidates, keyword_scores)
        best_keyword = max(keyword_scores.values(), default=0.0)
        bm25_weight = bm25_weight_for(query)
        stored = store.chunk_vectors(list(candidates))
        hits = store.chunks(list(candidates | set(keyword_scores)))
        scored: list[ScoredHit] = []
        for i, hit in hits.items():
            cosine = max((float(stored[i] @ v) for v in vectors), default=0.0) \
                if i in stored else 0.0
            score, relevance = max(
                (self._rerank(variant, hit, cosine, trigram_scores.get(i, 0.0))
                 for variant in variants), key=lambda pair: pair[0])
            if best_keyword > 0:
                score += bm25_weight * keyword_scores.get(i, 0.0) / best_keyword
            if mode == "vector":
                score = cosine
            elif mode == "keyword":
                score = keyword_scores.get(i, 0.0)
                if i not in keyword_scores:
                    continue
            elif i not in candidates:
                continue
            scored.append(ScoredHit(hit, score, relevance))
        scored.sort(key=lambda s: -s.score)
        return scored[:k]

    @staticmethod
    def variants(query: str, alternates: Sequence[str] = ()) -> list[str]:
        return [query, *(a for a in alternates if a and a != query)]

    @staticmethod
    def _score_missing(store: Store, variants: Sequence[str], candidates: set[int],
                       keyword_scores: dict[int, float]) -> None:
        """BM25 for the vector candidates outside the keyword top list. Without it, of two
        chunks that match the question's words alike, the one ranked just past CANDIDATES
        by BM25 (common words in a long manual) scores up to the whole BM25 weight less."""
        missing = [i for i in candidates if i not in keyword_scores]
        for variant in variants:
            terms = query_terms(variant)
            if not terms or not missing:
                continue
            for i, score in store.keyword_scores(fts_query(terms), missing).items():
                keyword_scores[i] = max(score, keyword_scores.get(i, 0.0))

    @staticmethod
    def _keyword(store: Store, kb: str, query: str
                 ) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """BM25 matches of the question's words (porter index) and of its CJK trigrams."""
        terms = query_terms(query)
        cjk = trigram_query(query)
        return (store.keyword_search(kb, fts_query(terms), CANDIDATES) if terms else [],
                store.keyword_search(kb, cjk, CANDIDATES, trigram=True) if cjk else [])

    @staticmethod
    def _rerank(query: str, hit: ChunkHit, cosine: float, trigram: float
                ) -> tuple[float, float]:
        """(ranking score, relevance) of one chunk for one wording of the question."""
        haystack = f"{hit.title} {_file_words(hit.doc_path)} {hit.heading} {hit.text}".lower()
        stems, identifiers, grams, options = _question(query)
        score = cosine + TRIGRAM_WEIGHT * trigram
        share = 0.0
        if stems:
            found = words(haystack)
            share = sum(t in found for t in stems) / len(stems)
            score += TERM_WEIGHT * share
        found_ids = 0.0
        if identifiers or options:
            cased = f"{hit.heading}\n{hit.text}"
            found = (sum(t in haystack for t in identifiers)
                     + sum(bool(o.search(cased)) for o in options))
            found_ids = found / (len(identifiers) + len(options))
            score += IDENTIFIER_WEIGHT * found_ids
            if options:  # an option's own entry is headed by it ("-H, --health")
                headed = sum(bool(o.search(hit.heading)) for o in options) / len(options)
                score += IDENTIFIER_WEIGHT * headed
        if grams:
            gram_share = sum(g in haystack for g in grams) / len(grams)
            score += TERM_WEIGHT * gram_share
            share = max(share, gram_share)
        return score, cosine + TERM_WEIGHT * share + IDENTIFIER_WEIGHT * found_ids
