"""Which passages an answer is given from the ranked chunks (passages.py)."""

from __future__ import annotations

from edgekb.passages import passages, ranked
from edgekb.retrieval import ScoredHit
from edgekb.store import ChunkHit


def chunk(doc: int, heading: str, ord_: int, score: float, text: str = "") -> ScoredHit:
    hit = ChunkHit(doc * 100 + ord_, "default", f"/docs/manual-{doc}.txt", f"Manual {doc}",
                   heading, None, text or f"{heading} part {ord_}", ord=ord_)
    return ScoredHit(hit, score, score)


def headings(found: list[ScoredHit]) -> list[str]:
    return [s.hit.heading for s in found]


def test_the_answering_chunk_behind_a_sibling_joins_its_section_passage() -> None:
    # "-t TEST" is one long entry: the chunk naming the option ranks first, the one that
    # says what the tests do ranks fifth, behind three other sections.
    found = [chunk(1, "-t TEST", 1, 0.9, "-t TEST, --test=TEST\nRuns a self-test."),
             chunk(2, "-H", 1, 0.8), chunk(3, "-i", 1, 0.7), chunk(4, "-c", 1, 0.6),
             chunk(1, "-t TEST", 2, 0.5, "Runs a self-test.\nshort: about two minutes")]
    given = passages(found, 4, 2)
    assert headings(given) == ["-t TEST", "-H", "-i", "-c"]
    # In document order, the overlapping line said once.
    assert given[0].hit.text == "-t TEST, --test=TEST\nRuns a self-test.\nshort: about two minutes"
    assert given[0].score == 0.9


def test_siblings_come_only_from_the_chosen_sections_and_are_bounded() -> None:
    found = [chunk(1, "A", 1, 0.9), chunk(2, "B", 1, 0.8)]
    found += [chunk(3, "C", 1, 0.7)]  # a section outside the best 2 chunks: never joins
    found += [chunk(1, "A", n, 0.6 - n / 100) for n in range(2, 6)]  # four more of A
    found += [chunk(2, "B", 2, 0.3)]
    given = passages(found, 2, 3)
    assert headings(given) == ["A", "B"]
    assert given[0].hit.text.count("A part") == 3  # at most 3 chunks of a section
    assert given[1].hit.text.count("B part") == 2  # the siblings left over go to B
    assert passages(found, 2, 0)[0].hit.text == "A part 1"  # none asked: the chunks alone


def test_the_best_chunks_decide_the_sections() -> None:
    # Two of the best three chunks are A's: A and B are the passages, as without siblings.
    found = [chunk(1, "A", 1, 0.9), chunk(2, "B", 1, 0.8), chunk(1, "A", 2, 0.7),
             chunk(3, "C", 1, 0.6)]
    given = passages(found, 3, 2)
    assert headings(given) == ["A", "B"]
    assert given[0].hit.text == "A part 1\nA part 2"


def test_ranked_puts_the_other_sections_behind_the_given_passages() -> None:
    found = [chunk(1, "A", 1, 0.9), chunk(2, "B", 1, 0.8), chunk(3, "C", 1, 0.7),
             chunk(3, "C", 2, 0.6), chunk(4, "D", 1, 0.5)]
    assert headings(ranked(found, 2, 2)) == ["A", "B", "C", "D"]
    assert ranked(found, 2, 2)[2].hit.text == "C part 1"  # beyond k: a section's best chunk
