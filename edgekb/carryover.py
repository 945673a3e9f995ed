"""A follow-up keeps the sources of the answer before it.

"What pressure does it trip at?" after "How do I reset the pump after an overpressure trip?"
is about the pump the earlier sources described, and those sources are what the technician
just read. So a follow-up's sources start with the earlier answer's sources that its own
search found again (all of them for a short follow-up such as "and after that?", whose
search means little), in their earlier order and with the same text, then its new passages:
one source more at most than a new question would get.

That order is also what makes the follow-up quick: the prompt starts with the sources
(prompt.py), so an unchanged lead of sources leaves the earlier prompt's KV cache usable up to
the earlier answer, and the idle pre-read (idle.py) reads that far before the follow-up comes.

Kept per session in memory, bounded; after a restart a follow-up simply searches afresh.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from .retrieval import ScoredHit
from .sessions import Turn

MAX_SESSIONS = 256  # sessions whose last sources are kept (about 8 KB each), oldest dropped


def section(scored: ScoredHit) -> tuple[str, str, int | None]:
    """What a source is (merge_neighbours joins a section's chunks into one source)."""
    hit = scored.hit
    return hit.doc_path, hit.heading, hit.page


@dataclass(frozen=True)
class LastSources:
    question: str
    hits: tuple[ScoredHit, ...]


class SessionSources:
    """The sources each session's last answer was given, for its follow-up."""

    def __init__(self, size: int = MAX_SESSIONS) -> None:
        self.size = size
        self._kept: OrderedDict[str, LastSources] = OrderedDict()

    def put(self, session: str, question: str, hits: Sequence[ScoredHit]) -> None:
        self._kept.pop(session, None)
        self._kept[session] = LastSources(question, tuple(hits))
        while len(self._kept) > self.size:
            self._kept.popitem(last=False)

    def after(self, session: str | None, history: Sequence[Turn]) -> tuple[ScoredHit, ...]:
        """The sources of the session's last answer, if that answer is the newest turn of
        ``history``; () otherwise."""
        kept = self._kept.get(session) if session is not None else None
        if kept is None or not history or kept.question != history[-1].question:
            return ()
        return kept.hits


def carry_over(earlier: Sequence[ScoredHit], found: Sequence[ScoredHit],
               hits: Sequence[ScoredHit], short: bool) -> list[ScoredHit]:
    """This question's sources: the ``earlier`` ones its search ``found`` again (every one if
    ``short``), then its own ``hits`` not among them; one source more at most than the
    larger of the two lists."""
    again = {section(s) for s in found}
    kept = [s for s in earlier if short or section(s) in again]
    if not kept:
        return list(hits)
    taken = {section(s) for s in kept}
    new = [s for s in hits if section(s) not in taken]
    return [*kept, *new][: max(len(hits), len(kept)) + 1]
