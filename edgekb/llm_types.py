"""What the LLM step hands back: prompt-reading progress, text pieces, and how it finished.

Shared by the local engine (llm.py and its worker, decoder.py) and the remote client
(llm_remote.py), so the answer pipeline sees the same events from both.
"""

from __future__ import annotations

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


# A paragraph break ends a spoken answer, except right after a colon: "follow these steps:"
# (or "以下步骤：") announces the list that comes next.
PARAGRAPH_BREAK = "\n\n"
LIST_INTRO = (":", "：")


class StopScanner:
    """Finds stop strings in streamed text, holding back what might be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.emitted = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was reached)."""
        self.text += piece
        for stop in self.stops:
            at = self.text.find(stop, max(0, self.emitted - len(stop)))
            while at != -1 and stop == PARAGRAPH_BREAK and \
                    self.text[:at].rstrip().endswith(LIST_INTRO):
                at = self.text.find(stop, at + 1)
            if at != -1:
                out = self.text[self.emitted : at]
                self.emitted = at
                return out, True
        hold = max((k for s in self.stops for k in range(1, len(s))
                    if self.text.endswith(s[:k])), default=0)
        end = max(self.emitted, len(self.text) - hold)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out, False

    def flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out
