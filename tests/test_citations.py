"""Citations a reader can check: [n] names a listed source, also while the answer streams."""

from __future__ import annotations

import pytest

from edgekb.citations import CitationFilter, attribute, cited_numbers


def stream(count: int, pieces: list[str]) -> tuple[str, CitationFilter]:
    citations = CitationFilter(count)
    out = "".join(citations.feed(p) for p in pieces) + citations.flush()
    return out, citations


def test_valid_citations_pass_and_one_pointing_at_nothing_is_removed() -> None:
    text, citations = stream(3, ["Close the valve [1]. Then press RESET [7] and wait [2]."])
    assert text == "Close the valve [1]. Then press RESET  and wait [2]."
    assert citations.kept == [1, 2] and citations.removed == 1


def test_a_citation_split_across_tokens_is_held_back_until_it_closes() -> None:
    citations = CitationFilter(2)
    shown = [citations.feed(p) for p in ["Open the drain ", "[", "2", "]", " now."]]
    # Nothing of the bracket shows before it is known to be valid; then it shows whole.
    assert shown == ["Open the drain ", "", "", "[2]", " now."]


@pytest.mark.parametrize("raw, count, expected", [
    ("see [1, 3]", 3, "see [1][3]"),
    ("see [source 2]", 2, "see [2]"),
    ("see [4, 5]", 3, "see "),
    ("a list [optional] here", 3, "a list [optional] here"),
    ("an array index a[", 3, "an array index a["),
])
def test_citation_forms(raw: str, count: int, expected: str) -> None:
    assert stream(count, list(raw))[0] == expected


def test_an_unclosed_bracket_is_released_not_swallowed() -> None:
    text, _ = stream(2, ["value [", "x" * 40, " more"])
    assert text == "value [" + "x" * 40 + " more"


def test_cited_numbers() -> None:
    assert cited_numbers("a [1] b [2, 3] c [x]") == {1, 2, 3}


def test_an_answer_copied_from_one_source_is_attributed_to_it() -> None:
    sources = ["Close the discharge valve, then hold RESET for 3 s.", "Grease every 500 h."]
    assert attribute("Close the discharge valve and hold RESET for 3 s.", sources) == [1]
    assert attribute("The weather is nice today in Paris.", sources) == []


def test_each_sentence_of_an_uncited_answer_goes_to_the_source_it_came_from() -> None:
    sources = ["Grease the bearings every 500 h with EP2 grease.",
               "Close the discharge valve, then hold RESET for 3 s."]
    answer = "Hold RESET for 3 s after closing the discharge valve. Grease bearings every 500 h."
    assert attribute(answer, sources) == [2, 1]


def test_the_questions_own_words_are_no_evidence() -> None:
    # Every source found for the question holds its words: only the rest of the answer tells.
    sources = ["The minpoll directive sets the minimum polling interval.",
               "minpoll 4 polls every 16 seconds; the default minpoll is 6 (64 seconds)."]
    question = "What does the minpoll directive set?"
    assert attribute("The minpoll directive sets the minimum polling interval.",
                     sources, question) == [1]
    assert attribute("The minpoll directive is 6 by default, 64 seconds.", sources,
                     question) == [2]
    assert attribute("The minpoll directive.", sources, question) == []
