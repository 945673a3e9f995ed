"""Retrieval done ahead of a question, kept a short while for its answer; and "see also".

While the technician types, `typing` lookups run the same search the answer will (hints.py);
when the question sent matches a looked-up text, its answer starts from those hits instead of
embedding and searching again. The search asks for a few passages more than the prompt takes:
the best of them from a section no source of the answer came from is offered after the answer
as "see also".
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from .retrieval import ScoredHit

TTL_S = 60.0          # a lookup older than this is searched again (documents may have changed)
MAX_KEPT = 64         # lookups kept, the oldest dropped first
SEE_ALSO_EXTRA = 3    # passages searched beyond the prompt's k, candidates for "see also"
SEE_ALSO_SHARE = 0.75  # a "see also" scores at least this share of the best source's score

Key = tuple[str, tuple[str, ...] | None, int]


def normalise(text: str) -> str:
    """The form a typed text and an asked question are compared in."""
    return " ".join(text.split())


class RecentRetrievals:
    def __init__(self, ttl_s: float = TTL_S, size: int = MAX_KEPT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.size = size
        self.clock = clock
        self._kept: OrderedDict[Key, tuple[float, list[ScoredHit]]] = OrderedDict()

    def put(self, text: str, kbs: tuple[str, ...] | None, k: int,
            hits: list[ScoredHit]) -> None:
        key = (normalise(text), kbs, k)
        self._kept.pop(key, None)
        self._kept[key] = (self.clock(), hits)
        while len(self._kept) > self.size:
            self._kept.popitem(last=False)

    def get(self, text: str, kbs: tuple[str, ...] | None, k: int) -> list[ScoredHit] | None:
        key = (normalise(text), kbs, k)
        kept = self._kept.get(key)
        if kept is None:
            return None
        if self.clock() - kept[0] > self.ttl_s:
            del self._kept[key]
            return None
        return kept[1]


def _section(scored: ScoredHit) -> tuple[str, str]:
    return scored.hit.doc_path, scored.hit.heading


def see_also(candidates: Sequence[ScoredHit], used: Sequence[ScoredHit]) -> ScoredHit | None:
    """The best candidate from a section none of ``used`` came from, if it scores close to
    the best used source (a weak match is no help)."""
    if not used:
        return None
    taken = {_section(s) for s in used}
    floor = SEE_ALSO_SHARE * max(s.score for s in used)
    for scored in sorted(candidates, key=lambda s: -s.score):
        if _section(scored) not in taken and scored.score >= floor:
            return scored
    return None
