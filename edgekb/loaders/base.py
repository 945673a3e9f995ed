"""What every loader returns, and what loaders share: a text budget and a heading outline."""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import DocumentTooLarge

# Extracted text is capped so a small hostile file (or a 5000-page catalogue) cannot fill the
# RAM of a small board; 20 M characters is far more than any manual.
MAX_CHARS = 20_000_000


@dataclass(frozen=True)
class Section:
    heading: str          # heading path joined with " > ", "" for none
    page: int | None      # 1-based page for paged formats
    text: str


@dataclass(frozen=True)
class LoadedDocument:
    title: str
    format: str
    sections: list[Section]


Loader = Callable[[Path, bytes], LoadedDocument]


class TextBudget:
    """Counts the characters a loader extracts and stops it once the cap is passed."""

    def __init__(self, path: Path, limit: int = MAX_CHARS) -> None:
        self.path = path
        self.limit = limit
        self.used = 0

    def take(self, text: str) -> str:
        self.used += len(text)
        if self.used > self.limit:
            raise DocumentTooLarge(
                f"{self.path.name}: more than {self.limit:,} characters of text")
        return text


class Outline:
    """Lines grouped under the heading path in force; a heading closes the section before it.

    An empty line ends a paragraph (chunking splits paragraphs first); runs of them collapse.
    """

    def __init__(self) -> None:
        self.sections: list[Section] = []
        self._stack: list[tuple[int, str]] = []
        self._lines: list[str] = []

    def heading(self, level: int, text: str) -> None:
        self.flush()
        while self._stack and self._stack[-1][0] >= level:
            self._stack.pop()
        self._stack.append((level, text))

    def reset(self) -> None:
        """A heading that is the document title: it ends the path but is not part of it."""
        self.flush()
        self._stack.clear()

    def add(self, line: str) -> None:
        line = line.rstrip().rstrip("\u00b6")  # a permalink mark after a Sphinx term
        if line.strip() or (self._lines and self._lines[-1]):
            self._lines.append(line)

    def flush(self) -> None:
        body = "\n".join(self._lines).strip()
        if body:
            self.sections.append(Section(" > ".join(h for _, h in self._stack), None, body))
        self._lines.clear()


def table_row(cells: Iterable[str]) -> str:
    """One table row on one line, pipe-framed: chunking keeps "|" lines whole."""
    return "| " + " | ".join(" ".join(cell.split()) for cell in cells) + " |"


# Permalink marks that documentation generators put after headings (Sphinx, pandoc).
_HEADING_MARKS = "\u00b6\u00a7#\uf0c1"
_TITLE_SUFFIX = re.compile(r"\s+[\u2014\u2013|-]\s+(?P<project>[^\u2014\u2013|]+?)\s+"
                           r"(?:latest\s+|v?[\d.]+\s+)?(?:documentation|docs)\s*$", re.IGNORECASE)


def clean_heading(text: str) -> str:
    """One line, entities decoded, without trailing permalink marks such as pandoc's "¶"."""
    return " ".join(html.unescape(text).split()).rstrip(_HEADING_MARKS).strip()


def clean_title(text: str) -> str:
    """A page title a reader can use: "VRRP — FRR latest documentation" -> "VRRP (FRR)",
    entities decoded."""
    title = clean_heading(text)
    return _TITLE_SUFFIX.sub(lambda m: f" ({m['project']})", title).strip() or title


_FURNITURE_HEADINGS = frozenset({"navigation", "table of contents", "previous topic",
                                 "next topic", "this page", "quick search", "contents"})


def is_furniture(section: Section) -> bool:
    """Sphinx and DocBook page chrome that survives as text: navigation bars, the sidebar's
    table of contents, "Show Source"; matched instead of the answer, it only misleads."""
    return section.heading.rsplit(" > ", 1)[-1].lower() in _FURNITURE_HEADINGS


def stem_title(path: Path) -> str:
    return path.stem.replace("-", " ").replace("_", " ")


def title_from_text(path: Path, text: str) -> str:
    """The first line when it is short enough to be a title, else the file name."""
    first = next((line.strip() for line in text[:2000].splitlines() if line.strip()), "")
    return first if 0 < len(first) <= 100 and _has_words(first) else stem_title(path)


def _has_words(title: str) -> bool:
    """A title has at least a few letters: "." or "3" (a page number) is no title."""
    return sum(c.isalpha() for c in title) >= 3
