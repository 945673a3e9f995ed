"""Sections -> chunks of at most ``chunk_tokens`` embedder tokens, with overlap.

Chunks break at paragraph and sentence ends (including CJK 。！？；), and keep table rows and
list items whole, so a config entry or a parameter row is never cut in half.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from .loaders import Section
from .store import NewChunk

CountTokens = Callable[[Sequence[str]], list[int]]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)|(?<=[。！？；])")
_LINE_ITEM = re.compile(r"^\s*(\||[-*+]\s|\d+[.)]\s)")


def split_units(text: str) -> list[str]:
    """Paragraphs -> sentences; table rows and list items are units of their own."""
    units: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line for line in paragraph.splitlines() if line.strip()]
        prose: list[str] = []
        for line in lines:
            if _LINE_ITEM.match(line):
                units.extend(_sentences(" ".join(prose)))
                prose = []
                units.append(line.strip())
            else:
                prose.append(line.strip())
        units.extend(_sentences(" ".join(prose)))
    return [u for u in units if u]


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()] if text else []


def _split_long(unit: str, tokens: int, limit: int) -> list[str]:
    """Cut a unit longer than the limit at spaces (or characters, for CJK) by token ratio."""
    pieces = max(2, -(-tokens // limit) + 1)
    words = unit.split(" ") if " " in unit else list(unit)
    joiner = " " if " " in unit else ""
    size = -(-len(words) // pieces)
    return [joiner.join(words[i : i + size]) for i in range(0, len(words), size)]


def chunk_sections(sections: Sequence[Section], count_tokens: CountTokens, chunk_tokens: int,
                   overlap_tokens: int) -> list[NewChunk]:
    chunks: list[NewChunk] = []
    for section in sections:
        units = split_units(section.text)
        counts = count_tokens(units) if units else []
        sized: list[tuple[str, int]] = []
        for unit, count in zip(units, counts):
            if count <= chunk_tokens:
                sized.append((unit, count))
            else:
                parts = _split_long(unit, count, chunk_tokens)
                sized.extend(zip(parts, count_tokens(parts)))
        chunks.extend(_pack(section, sized, chunk_tokens, overlap_tokens))
    return chunks


def _pack(section: Section, units: list[tuple[str, int]], limit: int,
          overlap: int) -> list[NewChunk]:
    chunks: list[NewChunk] = []
    current: list[tuple[str, int]] = []
    fresh = 0  # units in `current` not yet emitted in a chunk

    def emit() -> None:
        chunks.append(NewChunk(section.heading, section.page,
                               "\n".join(u for u, _ in current), sum(c for _, c in current)))

    for unit in units:
        if current and sum(c for _, c in current) + unit[1] > limit:
            emit()
            carried: list[tuple[str, int]] = []
            for prev in reversed(current):  # overlap: the last whole units that fit
                if sum(c for _, c in carried) + prev[1] > overlap:
                    break
                carried.insert(0, prev)
            current, fresh = carried, 0
            if sum(c for _, c in current) + unit[1] > limit:
                current = []
        current.append(unit)
        fresh += 1
    if current and fresh:
        emit()
    return chunks
