"""What the LLM step hands back: prompt-reading progress, text pieces, and how it finished.

Shared by the local engine (llm.py and its worker, decoder.py) and the remote client
(llm_remote.py), so the answer pipeline sees the same events from both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Reading:
    """Prompt evaluation progress."""

    done: int
    total: int


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    finish: str             # stop | length | cancelled
    prompt_tokens: int
    cached_tokens: int      # prompt tokens reused from the KV cache
    completion_tokens: int
    prompt_ms: float
    generation_ms: float


LlmEvent = Reading | Piece | Finished


# A paragraph break ends a spoken answer, but not a list's: not right after a colon ("follow
# these steps:", "以下步骤："), nor when a list item or a code block comes next. Deciding the
# latter waits for the next few characters.
PARAGRAPH_BREAK = "\n\n"
LIST_INTRO = (":", "：")
_GOES_ON = re.compile(r"\s*(\d{1,2}[.)]\s|[-*•]\s|```)")
_UNDECIDED = re.compile(r"\s*(\d{1,2}[.)]?|[-*•]|`{1,2})?")


def _paragraph_break(text: str, at: int) -> str:
    """What the paragraph break at ``at`` does: "stop" the answer, "go" on, or "wait"."""
    if text[:at].rstrip().endswith(LIST_INTRO):
        return "go"
    after = text[at + len(PARAGRAPH_BREAK) :]
    if _GOES_ON.match(after):
        return "go"
    return "wait" if _UNDECIDED.fullmatch(after) else "stop"


class StopScanner:
    """Finds stop strings in streamed text, holding back what might be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.emitted = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was reached)."""
        self.text += piece
        waiting = len(self.text)  # held back: a paragraph break not decided yet
        for stop in self.stops:
            at = self.text.find(stop, max(0, self.emitted - len(stop)))
            while at != -1 and stop == PARAGRAPH_BREAK:
                verdict = _paragraph_break(self.text, at)
                if verdict == "stop":
                    break
                if verdict == "wait":
                    waiting, at = min(waiting, at), -1
                    break
                at = self.text.find(stop, at + 1)
            if at != -1:
                out = self.text[self.emitted : at]
                self.emitted = at
                return out, True
        hold = max((k for s in self.stops for k in range(1, len(s))
                    if self.text.endswith(s[:k])), default=0)
        end = max(self.emitted, min(len(self.text) - hold, waiting))
        out = self.text[self.emitted : end]
        self.emitted = end
        return out, False

    def flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out
