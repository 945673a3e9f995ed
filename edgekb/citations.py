"""Citations a technician can check: every [n] in an answer names a listed source.

The LLM is told to cite sources as [1], [2]; small models also write [7] with four sources, or
[source 2]. While the answer streams, text from a "[" is held back until the bracket closes
(or clearly is no citation), then a citation's numbers are kept when they name a source and the
bracket is dropped when none does. So the reader never sees a citation pointing at nothing,
and never sees one appear and vanish. An answer that cites nothing although its sentences are
taken from the sources gets those sources' numbers at its end (``attribute``).
"""

from __future__ import annotations

import re

from .retrieval import CJK, STOPWORDS, WORD, cjk_bigrams, stem

_CITATION = re.compile(r"\[\s*(?:sources?\s*)?(\d{1,3}(?:\s*[,;-]\s*\d{1,3})*)\s*\]",
                       re.IGNORECASE)
_MAX_HELD = 24  # a bracket still open after this many characters is no citation


# Share of a sentence's content words that must occur in a source for the engine to name that
# source when the model cited nothing (small models often copy a passage and forget its number).
ATTRIBUTION_SHARE = 0.5
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[\u3002\uff01\uff1f])|\n+")


def content_terms(text: str, cjk: bool = True) -> set[str]:
    """Stemmed words that say something (no stopwords), numbers and identifiers whole,
    CJK runs as bigrams (``cjk`` False: left out)."""
    terms: set[str] = set()
    for token in WORD.findall(text.lower()):
        if CJK.search(token):
            if cjk:
                terms.update(cjk_bigrams(token))
        elif any(c.isdigit() for c in token) or (len(token) >= 3 and token not in STOPWORDS):
            terms.add(stem(token))
    return terms


def attribute(answer: str, sources: list[str], question: str = "") -> list[int]:
    """The 1-based sources an uncited answer was taken from, in the order its sentences use
    them. A sentence goes to the source holding most of what it adds to the question (its
    content words the question did not bring: every source found holds those), when that
    source holds at least ATTRIBUTION_SHARE of all its content words. A sentence in Chinese
    about English sources is judged by its identifiers and numbers, the words a translation
    keeps. A citation computed from the text, so still checkable."""
    cjk = any(CJK.search(s) for s in sources)
    asked = content_terms(question, cjk)
    held = [content_terms(s, cjk) for s in sources]
    numbers: list[int] = []
    if not held:
        return numbers
    for sentence in _SENTENCE_END.split(answer):
        terms = content_terms(sentence, cjk)
        added = terms - asked
        if not added:
            continue  # a sentence that only repeats the question is evidence of nothing
        best = max(range(len(held)),  # the higher-ranked source on a tie
                   key=lambda i: (len(added & held[i]), len(terms & held[i])))
        if (added & held[best] and len(terms & held[best]) / len(terms) >= ATTRIBUTION_SHARE
                and best + 1 not in numbers):
            numbers.append(best + 1)
    return numbers


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
