"""Documents -> titled sections of plain text, one loader per format.

A loader returns the document's title and its sections, each with the heading path or page a
citation needs ("Safety > Lockout", "p. 12"). Loaders are blocking and run off the event loop.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import EmptyDocument, IngestError, UnsupportedFormat


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


def decode_text(path: Path, data: bytes) -> str:
    """UTF-8 (with or without BOM) or UTF-16 with BOM; binary data is refused."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    if b"\x00" in data[:8192]:
        raise IngestError(f"{path.name}: looks like a binary file, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise IngestError(f"{path.name}: not valid UTF-8 text ({exc.reason} at byte {exc.start})")


def _title_from_text(path: Path, text: str) -> str:
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first if 0 < len(first) <= 100 else path.stem.replace("-", " ").replace("_", " ")


def load_text(path: Path, data: bytes) -> LoadedDocument:
    text = decode_text(path, data)
    return LoadedDocument(_title_from_text(path, text), "txt", [Section("", None, text)])


_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def load_markdown(path: Path, data: bytes) -> LoadedDocument:
    """Split at ATX headings, keeping the heading path; fenced code is never a heading."""
    text = decode_text(path, data)
    title = ""
    stack: list[tuple[int, str]] = []
    sections: list[Section] = []
    lines: list[str] = []
    in_fence = False

    def flush() -> None:
        body = "\n".join(lines).strip()
        if body:
            sections.append(Section(" > ".join(h for _, h in stack), None, body))
        lines.clear()

    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        match = None if in_fence else _HEADING.match(line)
        if match is None:
            lines.append(line)
            continue
        flush()
        level, heading = len(match.group(1)), match.group(2)
        if level == 1 and not title:
            title = heading
            continue  # the title is not part of every heading path
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, heading))
    flush()
    return LoadedDocument(title or _title_from_text(path, text), "markdown", sections)


LOADERS: dict[str, Loader] = {
    ".txt": load_text,
    ".text": load_text,
    ".md": load_markdown,
    ".markdown": load_markdown,
}


def supported(path: Path) -> bool:
    return path.suffix.lower() in LOADERS


def load_document(path: Path, data: bytes) -> LoadedDocument:
    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        known = ", ".join(sorted(LOADERS))
        raise UnsupportedFormat(f"{path.name}: unsupported format (supported: {known})")
    document = loader(path, data)
    if not any(s.text.strip() for s in document.sections):
        raise EmptyDocument(f"{path.name}: no text found")
    return document
