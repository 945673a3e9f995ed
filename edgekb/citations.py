"""Citations a technician can check: every [n] in an answer names a listed source.

The LLM is told to cite sources as [1], [2]; small models also write [7] with four sources, or
[source 2]. While the answer streams, text from a "[" is held back until the bracket closes
(or clearly is no citation), then a citation's numbers are kept when they name a source and the
bracket is dropped when none does. So the reader never sees a citation pointing at nothing,
and never sees one appear and vanish. An answer that cites nothing although it is taken from
one source gets that source's number at its end (``attribute``).
"""

from __future__ import annotations

import re

_CITATION = re.compile(r"\[\s*(?:sources?\s*)?(\d{1,3}(?:\s*[,;-]\s*\d{1,3})*)\s*\]",
                       re.IGNORECASE)
_MAX_HELD = 24  # a bracket still open after this many characters is no citation


# Share of an answer's words that must occur in a source for the engine to name it when the
# model cited nothing (small models often copy the passage and forget the number).
ATTRIBUTION_SHARE = 0.5


def attribute(answer: str, sources: list[str]) -> int | None:
    """The 1-based source whose text holds the most of the answer's words, when it holds at
    least ATTRIBUTION_SHARE of them: a citation computed from the text, so still checkable."""
    words = {w for w in re.findall(r"\w{3,}", answer.lower())}
    if not words or not sources:
        return None
    shares = [len(words & set(re.findall(r"\w{3,}", s.lower()))) / len(words) for s in sources]
    best = max(range(len(shares)), key=shares.__getitem__)
    return best + 1 if shares[best] >= ATTRIBUTION_SHARE else None


def cited_numbers(text: str) -> set[int]:
    return {int(n) for match in _CITATION.finditer(text)
            for n in re.findall(r"\d+", match.group(1))}


class CitationFilter:
    """Streams text through, rewriting citations to the sources 1..``count``."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.held = ""
        self.kept: list[int] = []   # valid numbers, in order of first citation
        self.removed = 0            # citations (single numbers) that named no source

    def feed(self, text: str) -> str:
        out: list[str] = []
        for char in text:
            if self.held:
                self.held += char
                if char == "]":
                    out.append(self._resolve(self.held))
                    self.held = ""
                elif char == "[" or len(self.held) > _MAX_HELD or char == "\n":
                    out.append(self.held[:-1])  # not a citation: release it
                    self.held = char if char == "[" else ""
                    if char != "[":
                        out.append(char)
            elif char == "[":
                self.held = char
            else:
                out.append(char)
        return "".join(out)

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held

    def _resolve(self, bracket: str) -> str:
        match = _CITATION.fullmatch(bracket)
        if match is None:
            return bracket  # "[x]", "[optional]": not a citation
        numbers = [int(n) for n in re.findall(r"\d+", match.group(1))]
        valid = [n for n in numbers if 1 <= n <= self.count]
        self.removed += len(numbers) - len(valid)
        for n in valid:
            if n not in self.kept:
                self.kept.append(n)
        return "".join(f"[{n}]" for n in dict.fromkeys(valid))
