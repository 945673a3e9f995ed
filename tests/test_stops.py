"""Stop strings on streamed text (llm_types.StopScanner), as every engine applies them: a
spoken answer ends at its paragraph break, but a paragraph that announces a list ("follow
these steps:") goes on to the list, and a stop string split across pieces never leaks."""

from __future__ import annotations

from edgekb.llm_types import StopScanner

STOPS = ("\n\n", "\n[")


def stream(text: str, size: int) -> tuple[str, bool]:
    """Feed ``text`` in pieces of ``size`` characters; (what was emitted, stopped)."""
    scanner = StopScanner(STOPS)
    out = []
    for start in range(0, len(text), size):
        piece, stopped = scanner.feed(text[start : start + size])
        out.append(piece)
        if stopped:
            return "".join(out), True
    out.append(scanner.flush())
    return "".join(out), False


def test_a_spoken_answer_ends_at_its_paragraph_break() -> None:
    for size in (1, 2, 3, 7, 100):
        assert stream("Close the valve [1].\n\nI hope this helps.", size) == \
            ("Close the valve [1].", True)


def test_an_announced_list_is_not_cut_at_its_introduction() -> None:
    answer = ("To reset the pump, follow these steps:\n\n1. Close the discharge valve [1].\n"
              "2. Press RESET for 3 seconds [1].\n\nLet me know if you need more.")
    for size in (1, 2, 5, 100):
        text, stopped = stream(answer, size)
        assert stopped
        assert text == answer.split("\n\nLet me")[0], text


def test_list_items_and_code_blocks_after_blank_lines_go_on() -> None:
    answer = ("Here is how:\n\n1. Open the configuration file [1].\n\n2. Add ssl.pemfile "
              "[1]:\n\n```\nssl.engine = \"enable\"\n```\n\n- Restart lighttpd [2].\n\n"
              "I hope this helps!")
    for size in (1, 2, 3, 100):
        text, stopped = stream(answer, size)
        assert stopped and text == answer.split("\n\nI hope")[0], (size, text)


def test_a_chinese_list_introduction_goes_on_too() -> None:
    text, stopped = stream("可以通过以下步骤实现：\n\n1. 打开配置文件 [1]。\n\n谢谢。", 2)
    assert stopped and text == "可以通过以下步骤实现：\n\n1. 打开配置文件 [1]。"


def test_a_copied_source_block_still_stops_the_answer() -> None:
    text, stopped = stream("The steps are:\n[2] Pump manual (Troubleshooting)\nClose", 1)
    assert stopped and text == "The steps are:"
