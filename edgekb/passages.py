"""Ranked chunks -> the passages an answer is given: one per document section.

A long manual entry (a man page's "-t TEST", a 24 kB "Starting HAProxy" section) is cut into
several chunks, and the chunk that matches a question best is often not the one that answers
it: on the held-out manuals the answering chunk sat at rank 4-6 behind a sibling. So each
section among the best ``k`` chunks becomes one passage, its chunks joined in document order,
and up to ``siblings`` more chunks of those sections from deeper in the ranking join them
(``retrieval.sibling_chunks``, default 2; MAX_CHUNKS_PER_SECTION a section at most). No other
section comes in: an extra section on the same subject, measured, made the 0.5B model answer
the demo's pump question with a cross-reference instead of the procedure.
Measured (passage hit@3, upstream / held out / blind / unseen): the top 4 chunks merged by
section gave 0.84 / 0.69 / 0.89 / 0.81, with 2 siblings 0.84 / 0.78 / 0.94 / 0.83.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from .retrieval import ScoredHit

DEPTH = 20  # ranked chunks searched for siblings of the chosen sections
MAX_CHUNKS_PER_SECTION = 3

Section = tuple[str, str, int | None]


def section(scored: ScoredHit) -> Section:
    """Which part of which manual a chunk is from (its heading, or its page)."""
    hit = scored.hit
    return hit.doc_path, hit.heading, hit.page


def passages(found: Sequence[ScoredHit], k: int, siblings: int) -> list[ScoredHit]:
    """One passage for each section among the best ``k`` chunks of ``found`` (ranked, best
    first), joined with up to ``siblings`` more chunks of those sections from deeper in the
    ranking (best first; a section takes one only while it has fewer than
    MAX_CHUNKS_PER_SECTION)."""
    chosen: dict[Section, list[ScoredHit]] = {}
    for scored in found[:k]:
        chosen.setdefault(section(scored), []).append(scored)
    left = siblings
    for scored in found[k:]:
        group = chosen.get(section(scored))
        if left and group is not None and len(group) < MAX_CHUNKS_PER_SECTION:
            group.append(scored)
            left -= 1
    return sorted((merge(group) for group in chosen.values()), key=lambda s: -s.score)


def ranked(found: Sequence[ScoredHit], k: int, siblings: int) -> list[ScoredHit]:
    """What the evaluation ranks: the ``k`` passages, then the first chunk of every other
    section in ``found``."""
    given = passages(found, k, siblings)
    taken = {section(s) for s in given}
    rest: dict[Section, ScoredHit] = {}
    for scored in found:
        if section(scored) not in taken:
            rest.setdefault(section(scored), scored)
    return [*given, *rest.values()]


def merge(group: Sequence[ScoredHit]) -> ScoredHit:
    """Chunks of one section joined in document order, their overlap said once, scored by the
    best of them."""
    if len(group) == 1:
        return group[0]
    lines: list[str] = []
    for scored in sorted(group, key=lambda s: s.hit.ord):
        new = scored.hit.text.split("\n")
        overlap = next((n for n in range(min(len(lines), len(new)), 0, -1)
                        if lines[-n:] == new[:n]), 0)
        lines.extend(new[overlap:])
    best = max(group, key=lambda s: s.score)
    return ScoredHit(replace(best.hit, text="\n".join(lines)), best.score, best.relevance)
