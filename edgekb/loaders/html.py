"""HTML -> the page's main text under its h1..h6 path, without navigation, scripts or chrome.

A small tokenizer of our own drives it. html.parser is quadratic on inputs like "<a <a <a"
(60 KB took 39 s) and libxml2's HTML parser on misnested tags ("<b>x</i>" repeated): here every
search that fails consumes the rest of the input, so the work stays linear in its length.
Elements are tracked by counts, not a tree: an unclosed <nav> hides the rest of the page, as it
would in a browser.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from html import unescape
from pathlib import Path

from .base import (LoadedDocument, Outline, Section, TextBudget, clean_heading, clean_title,
                   is_furniture, stem_title, table_row)
from .text import decode_text

_DROP = frozenset({"script", "style", "nav", "aside", "form", "noscript", "template", "svg",
                   "iframe", "select", "button", "textarea", "object", "canvas"})
_CHROME = frozenset({"header", "footer"})  # site chrome; an article's own header is content
_SCOPE = frozenset({"main", "article"})
_KIND = {**dict.fromkeys(_DROP, "drop"), **dict.fromkeys(_CHROME, "chrome"),
         **dict.fromkeys(_SCOPE, "scope")}
_BLOCK = frozenset({"p", "div", "section", "ul", "ol", "dl", "pre", "blockquote", "figure",
                    "figcaption", "address", "details", "summary", "hr", "caption", "fieldset",
                    "center", "body", "table"}) | _CHROME | _SCOPE
_LINE = frozenset({"br", "dt", "dd"})
_HEADINGS = {f"h{n}": n for n in range(1, 7)}
_MAX_HEADING = 200  # longer "headings" are unclosed tags swallowing text: keep it as text

# Quoted attribute values may hold ">" (title="a > b"): the tag ends at the first ">" outside
# quotes. A value is bounded in length, so a stray quote costs a bounded scan, never a
# quadratic one.
_TAG = re.compile(r"<(/?)([a-zA-Z][^\s/<>]*)(?:[^<>\"']|\"[^\"]{0,4096}\"|'[^']{0,4096}')*>")
_BOGUS = re.compile(r"<[!?/][^<>]*>")  # doctype, processing instruction, stray end tag
_RAW_END = {name: re.compile(rf"</{name}[\s/>]", re.IGNORECASE)
            for name in ("script", "style", "title", "textarea")}
_META_CHARSET = re.compile(rb"<meta[^>]{0,512}?charset\s*=\s*[\"']?\s*([a-zA-Z0-9_.:-]{1,40})",
                           re.IGNORECASE)
_NAV_WORDS = frozenset({"prev", "up", "home", "next"})
_HAS_MAIN = re.compile(r"<(main|article)[\s>]", re.IGNORECASE)



def _tokens(text: str) -> Iterator[tuple[str, str]]:
    """("start" | "end" | "data", tag name or text) in document order."""
    pos, size = 0, len(text)
    while pos < size:
        lt = text.find("<", pos)
        if lt < 0:
            yield "data", text[pos:]
            return
        if lt > pos:
            yield "data", text[pos:lt]
        if text.startswith("<!--", lt):
            end = text.find("-->", lt + 4)
            pos = size if end < 0 else end + 3
            continue
        tag = _TAG.match(text, lt)
        if tag is None:
            bogus = _BOGUS.match(text, lt)
            if bogus is None:
                yield "data", "<"
            pos = bogus.end() if bogus else lt + 1
            continue
        name, pos = tag.group(2).lower(), tag.end()
        yield ("end" if tag.group(1) else "start"), name
        raw_end = None if tag.group(1) else _RAW_END.get(name)
        if raw_end is not None:  # script, style, title: text up to the end tag, no markup
            found = raw_end.search(text, pos)
            yield "data", text[pos:found.start() if found else size]
            pos = found.start() if found else size


def _is_nav_row(cells: list[str]) -> bool:
    """DocBook's "Prev | Up | Home | Next" bars, a table row of links around every page."""
    words = {" ".join(cell.split()).lower() for cell in cells}
    return len(words & _NAV_WORDS) >= 2


class _PageText:
    """Turns tokens into sections: headings open sections, rows and list items stay lines."""

    def __init__(self, budget: TextBudget, main_only: bool) -> None:
        self.budget = budget
        self.main_only = main_only
        self.title = ""
        self.outline = Outline()
        self._open: Counter[str] = Counter()
        self._depth: Counter[str] = Counter()  # open elements per kind: drop, chrome, scope
        self._title: list[str] | None = None
        self._heading: tuple[int, list[str]] | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._line: list[str] = []
        self._pre = 0

    def _kept(self) -> bool:
        if self._depth["drop"]:
            return False
        if self._depth["scope"]:
            return True
        return not self._depth["chrome"] and not self.main_only

    def start(self, tag: str) -> None:
        kind = _KIND.get(tag)
        if kind:
            self._open[tag] += 1
            self._depth[kind] += 1
        if tag == "pre":
            self._pre += 1
        if tag == "title" and not self.title and not self._depth["drop"]:
            self._title = []
        elif not self._kept():
            return
        elif tag in _HEADINGS and self._cell is None:
            self._end_heading()
            self._end_row()
            self._break(paragraph=True)
            self._heading = (_HEADINGS[tag], [])
        elif tag == "tr":
            self._end_row()
            self._row = []
        elif tag in ("td", "th"):
            self._end_cell()
            self._row = [] if self._row is None else self._row
            self._cell = []
        elif tag == "li":
            self._break()
            self._line.append("- ")
        elif tag in _LINE or tag in _BLOCK:
            self._break(paragraph=tag in _BLOCK)

    def end(self, tag: str) -> None:
        if tag == "title" and self._title is not None:
            self.title = " ".join("".join(self._title).split())
            self._title = None
        if tag == "pre" and self._pre:
            self._pre -= 1
        kept = self._kept()  # before the counts drop: </main> still belongs to the main text
        kind = _KIND.get(tag)
        if kind and self._open[tag]:
            self._open[tag] -= 1
            self._depth[kind] -= 1
        if not kept:
            return
        if tag in _HEADINGS:
            self._end_heading()
        elif tag in ("td", "th"):
            self._end_cell()
        elif tag in ("tr", "table"):
            self._end_row()
        if tag in _BLOCK or tag == "li":
            self._break(paragraph=tag in _BLOCK)

    def data(self, text: str) -> None:
        if self._title is not None:
            self._title.append(text)
            return
        if not self._kept():
            return
        text = self.budget.take(unescape(text))
        if self._heading is not None:
            self._heading[1].append(text)
        elif self._cell is not None:
            self._cell.append(text)
        elif self._pre:
            first, *rest = text.split("\n")
            self._line.append(first)
            for line in rest:
                self._break()
                self._line.append(line)
        else:
            self._line.append(text)

    def _break(self, paragraph: bool = False) -> None:
        """End the current line (and paragraph); inside a heading or cell it is a space."""
        inline = self._heading[1] if self._heading is not None else self._cell
        if inline is not None:
            inline.append(" ")
            return
        line = " ".join("".join(self._line).split())
        self._line.clear()
        if line and line != "-":
            self.outline.add(line)
        if paragraph:
            self.outline.add("")

    def _end_heading(self) -> None:
        if self._heading is None:
            return
        level, parts = self._heading
        self._heading = None
        text = clean_heading("".join(parts))
        if len(text) > _MAX_HEADING:
            self.outline.add(text)
        elif text and not self.title and level == 1:
            self.title = text  # no <title>: the first h1 names the page, as in Markdown
            self.outline.reset()
        elif text == self.title:
            self.outline.reset()  # the title is not part of every heading path
        elif text:
            self.outline.heading(level, text)

    def _end_cell(self) -> None:
        if self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell))
        self._cell = None

    def _end_row(self) -> None:
        self._end_cell()
        cells, self._row = self._row, None
        if cells and any(cell.strip() for cell in cells) and not _is_nav_row(cells):
            self._break()
            self.outline.add(table_row(cells))

    def finish(self) -> list[Section]:
        self._end_heading()
        self._end_row()
        self._break()
        self.outline.flush()
        return self.outline.sections


def _read(path: Path, text: str, main_only: bool) -> _PageText:
    page = _PageText(TextBudget(path), main_only)
    for kind, value in _tokens(text):
        if kind == "data":
            page.data(value)
        elif kind == "start":
            page.start(value)
        else:
            page.end(value)
    page.finish()
    return page


def load_html(path: Path, data: bytes) -> LoadedDocument:
    declared = _META_CHARSET.search(data[:4096])
    text = decode_text(path, data, declared.group(1).decode("ascii") if declared else None)
    # Prefer <main>/<article> when the page has them; a page whose main is empty falls back
    # to all of its (non-chrome) text.
    has_main = _HAS_MAIN.search(text) is not None
    page = _read(path, text, main_only=has_main)
    if has_main and not page.outline.sections:
        page = _read(path, text, main_only=False)
    sections = [s for s in page.outline.sections if not is_furniture(s)]
    return LoadedDocument(clean_title(page.title) or stem_title(path), "html",
                          sections or page.outline.sections)
