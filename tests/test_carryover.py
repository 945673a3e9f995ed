"""Which sources a follow-up keeps from the answer before it (carryover.py)."""

from __future__ import annotations

from edgekb.carryover import SessionSources, carry_over
from edgekb.retrieval import ScoredHit
from edgekb.sessions import Turn
from edgekb.store import ChunkHit


def scored(n: int, heading: str = "", score: float = 1.0) -> ScoredHit:
    hit = ChunkHit(n, "default", f"/docs/manual-{n}.md", f"Manual {n}", heading or f"S{n}",
                   None, f"text {n}")
    return ScoredHit(hit, score, 0.6)


def ids(hits: list[ScoredHit]) -> list[int]:
    return [s.hit.id for s in hits]


def test_every_earlier_source_leads_in_its_order_while_the_topic_stays() -> None:
    earlier = [scored(1), scored(2), scored(3)]
    # The follow-up's search ranks 3 first, finds 1 among its extra candidates, not 2: 2
    # stays too, so the earlier prompt is unchanged up to the new passages.
    found = [scored(3), scored(7), scored(8), scored(9), scored(1)]
    hits = found[:4]
    assert ids(carry_over(earlier, found, hits, short=False, k=4)) == [1, 2, 3, 7, 8]


def test_a_follow_up_that_found_few_passages_still_keeps_every_earlier_one() -> None:
    # Its passages merged into two sections; the earlier answer had three: all three stay,
    # else the earlier prompt (and its KV cache) breaks at the one not found again.
    earlier = [scored(1), scored(2), scored(3)]
    found = [scored(3), scored(8)]
    assert ids(carry_over(earlier, found, found, short=False, k=4)) == [1, 2, 3, 8]


def test_a_long_conversation_keeps_only_what_it_found_again() -> None:
    earlier = [scored(n) for n in range(1, 6)]  # already one more than a new question gets
    found = [scored(n) for n in (4, 9, 2, 8)]
    assert ids(carry_over(earlier, found, found, short=False, k=4)) == [2, 4, 9, 8]


def test_at_most_one_source_more_than_a_new_question_gets() -> None:
    earlier = [scored(n) for n in range(1, 5)]
    found = [scored(n) for n in (4, 3, 9, 2, 1)]
    assert ids(carry_over(earlier, found, found[:4], short=False, k=4)) == [1, 2, 3, 4, 9]


def test_a_short_follow_up_keeps_every_earlier_source() -> None:
    earlier = [scored(1), scored(2)]
    found = [scored(5), scored(6)]
    assert ids(carry_over(earlier, found, found, short=True, k=4)) == [1, 2, 5, 6]
    # A longer question that found none of them again starts afresh.
    assert ids(carry_over(earlier, found, found, short=False, k=4)) == [5, 6]


def test_a_section_found_again_counts_even_through_another_chunk_of_it() -> None:
    earlier = [scored(1, heading="Reset")]
    other_chunk = ScoredHit(ChunkHit(11, "default", "/docs/manual-1.md", "Manual 1", "Reset",
                                     None, "more text"), 0.9, 0.6)
    assert ids(carry_over(earlier, [other_chunk], [other_chunk], short=False, k=4)) == [1]


def asked(question: str) -> list[Turn]:
    return [Turn(1, "r1", question, "An answer. [1]", [], "stop", 0.0)]


def test_kept_only_for_the_question_the_session_asked_last() -> None:
    kept = SessionSources(size=2)
    kept.put("s1", "How do I reset it?", [scored(1)])
    assert ids(list(kept.after("s1", asked("How do I reset it?")))) == [1]
    assert kept.after("s1", asked("Another question?")) == ()
    assert kept.after("s1", []) == ()
    assert kept.after(None, asked("How do I reset it?")) == ()
    kept.put("s2", "q2", [scored(2)])
    kept.put("s3", "q3", [scored(3)])
    assert kept.after("s1", asked("How do I reset it?")) == ()  # the oldest session went first
