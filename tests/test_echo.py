"""A copied source header at the start of an answer is dropped (echo.py), streamed in pieces
of every size the LLM worker may hand over."""

from __future__ import annotations

import pytest

from edgekb.echo import CopiedHeader

HEADERS = ["[1] Mosquitto broker (mosquitto.conf > max_inflight_messages)",
           "[2] Kafka consumer configs (auto.offset.reset)"]


def streamed(text: str, size: int, headers: list[str] = HEADERS) -> str:
    echo = CopiedHeader(headers)
    out = [echo.feed(text[i:i + size]) for i in range(0, len(text), size)]
    return "".join(out) + echo.flush()


@pytest.mark.parametrize("size", [1, 3, 7, 100])
def test_a_first_line_that_copies_a_header_is_dropped(size: int) -> None:
    answer = f"{HEADERS[1]}\n\nSet auto.offset.reset to earliest. [2]"
    assert streamed(answer, size) == "Set auto.offset.reset to earliest. [2]"
    # The header without its "(where)" counts too.
    assert streamed("[1] Mosquitto broker\nIt defaults to 20. [1]", size) == \
        "It defaults to 20. [1]"


@pytest.mark.parametrize("size", [1, 4, 100])
def test_other_answers_pass_unchanged(size: int) -> None:
    for answer in ("Set max_inflight_messages to 20 [1].",
                   "[1] Mosquitto broker limits in-flight messages to 20.\nSee [1].",
                   "[2] says: earliest.",
                   f"Quoting {HEADERS[0]}\nit is 20."):
        assert streamed(answer, size) == answer
    # Without sources there is nothing to copy.
    assert streamed(f"{HEADERS[0]}\nx", size, []) == f"{HEADERS[0]}\nx"


def test_a_header_later_in_the_answer_stays_and_an_answer_that_is_only_a_header_too() -> None:
    answer = f"It defaults to 20.\n{HEADERS[0]}\n"
    assert streamed(answer, 5) == answer
    assert streamed(HEADERS[0], 5) == HEADERS[0]  # nothing would be left of the answer
