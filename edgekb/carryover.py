"""A follow-up keeps the sources of the answer before it.

"What pressure does it trip at?" after "How do I reset the pump after an overpressure trip?"
is about the pump the earlier sources described, and those sources are what the technician
just read. So a follow-up that stays on their topic (its search finds a manual they came
from, or it is a short one such as "and after that?", whose search means little) keeps the
earlier answer's sources, in their order and with the same text, then its new passages: one
source more at most than a new question would get. A question whose search finds none of
those manuals starts afresh.

That order is also what makes the follow-up quick: the prompt starts with the sources
(prompt.py), so an unchanged lead of sources leaves the earlier prompt's KV cache usable up to
the earlier answer, and the idle pre-read (idle.py) reads that far before the follow-up comes.

Kept per session in memory, bounded; after a restart a follow-up simply searches afresh.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from .passages import section
from .retrieval import ScoredHit
from .sessions import Turn

MAX_SESSIONS = 256  # sessions whose last sources are kept (about 8 KB each), oldest dropped


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
               hits: Sequence[ScoredHit], short: bool, k: int) -> list[ScoredHit]:
    """This question's sources: every ``earlier`` one, in its order, when the question stays
    on their topic (``short``, or its search ``found`` a manual they came from), then its own
    ``hits`` not among them; one source more than a new question can get (``k``) at most,
    however few this one's search found. Keeping them all, not only those found again,
    leaves the earlier prompt unchanged up to the new sources, so its KV cache serves the
    follow-up that far; once a conversation has that many, only those found again stay, so a
    new passage always has room."""
    manuals = {s.hit.doc_path for s in found}
    if not earlier or not (short or manuals & {s.hit.doc_path for s in earlier}):
        return list(hits)
    most = k + 1  # hits are at most k passages
    kept = list(earlier)
    if len(kept) >= most:  # a long conversation: room for a new passage beats the cache
        again = {section(s) for s in found}
        kept = [s for s in earlier if short or section(s) in again]
    taken = {section(s) for s in kept}
    new = [s for s in hits if section(s) not in taken]
    return [*kept, *new][: max(most, len(kept))]
