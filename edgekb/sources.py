"""What the reader sees of a source: a real title, where it is, a snippet, a relevance band.

``source_entry`` builds the wire form of one source; it stays under ENTRY_BYTES encoded so that
one source fits in one event frame (the protocol caps frames at 1024 bytes). The snippet is cut
at sentence ends around the part of the chunk that matches the question best, and the relevance
is said in words: the raw score's scale changes from question to question.
"""

from __future__ import annotations

import json
import re
from pathlib import PurePath
from typing import Any

from .prompt import cite_where
from .retrieval import ScoredHit, query_terms, stem, words

ENTRY_BYTES = 700
SNIPPET_CHARS = 280
# Relevance bands on the same scale as the not-covered floor (answer.RELEVANCE_FLOOR).
BANDS = ((0.8, "high"), (0.6, "medium"), (float("-inf"), "low"))  # cosine may be < 0
_SENTENCE = re.compile(r"(?<=[.!?])\s+|(?<=[。！？；])|\n+")
MAX_TITLES = 8


def relevance_band(relevance: float) -> str:
    return next(name for floor, name in BANDS if relevance >= floor)


def snippet(text: str, question: str, limit: int = SNIPPET_CHARS) -> str:
    """Whole sentences around the one sharing most words with the question, within limit."""
    sentences = [s.strip() for s in _SENTENCE.split(text) if s.strip()]
    if not sentences:
        return ""
    terms = {stem(t) for t in query_terms(question)}
    scores = [len(terms & words(s.lower())) for s in sentences]
    best = max(range(len(sentences)), key=lambda i: (scores[i], -i))
    start, end = best, best + 1
    while True:  # grow forward first: the sentences after a match usually explain it
        grown = False
        for lo, hi in ((start, end + 1), (start - 1, end)):
            if lo >= 0 and hi <= len(sentences) and (lo, hi) != (start, end):
                if len(" ".join(sentences[lo:hi])) <= limit:
                    start, end, grown = lo, hi, True
                    break
        if not grown:
            break
    out = " ".join(sentences[start:end])
    if len(out) > limit:
        out = out[: limit - 1].rsplit(" ", 1)[0] + "…"
    prefix = "… " if start > 0 else ""
    suffix = " …" if end < len(sentences) and not out.endswith("…") else ""
    return prefix + out + suffix


def _cut_to_bytes(text: str, budget: int) -> str:
    data = text.encode()
    if len(data) <= budget:
        return text
    return data[: max(0, budget - 3)].decode(errors="ignore").rstrip() + "…"


def source_entry(number: int, scored: ScoredHit, question: str = "") -> dict[str, Any]:
    """{n, doc, title, where, page, snippet, relevance, score}, at most ENTRY_BYTES encoded."""
    hit = scored.hit
    entry: dict[str, Any] = {
        "n": number, "doc": _cut_to_bytes(PurePath(hit.doc_path).name, 100),
        "title": _cut_to_bytes(hit.title, 150), "where": _cut_to_bytes(cite_where(hit), 180),
        "page": hit.page,
        "snippet": snippet(hit.text, question), "relevance": relevance_band(scored.relevance),
        "score": round(scored.score, 4)}
    size = len(json.dumps(entry, ensure_ascii=False).encode())
    if size > ENTRY_BYTES:
        room = len(entry["snippet"].encode()) - (size - ENTRY_BYTES)
        entry["snippet"] = _cut_to_bytes(entry["snippet"], room)
    return entry


def not_covered_text(question: str, titles: list[str]) -> str:
    """The answer when no source is relevant, naming the manuals that were searched."""
    # Bounded: the answer is one delta event, and frames stay under 1024 bytes.
    shown = ", ".join(_cut_to_bytes(title, 80) for title in titles[:MAX_TITLES])
    more = len(titles) - MAX_TITLES
    if re.search(r"[\u4e00-\u9fff]", question):
        listed = shown + (f" 等 {len(titles)} 份" if more > 0 else "")
        return f"手册中没有涉及这个问题。已检索的手册：{listed or '（无）'}。"
    listed = shown + (f" and {more} more" if more > 0 else "")
    return f"The manuals do not cover this. Searched: {listed or 'no manuals'}."
