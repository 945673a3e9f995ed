"""PDF -> one section per page (1-based), headed by the outline entry in force on that page.

Streams are inflated under the ceilings of inflate.py. pypdf decodes a stream whole in memory
(up to its own limit, then it fails) and keeps it cached, so before a page is read its Flate
content streams and form XObjects are inflated by a counter that keeps nothing, against the
per-part and per-document ceilings; pypdf's own limits, set to the per-part ceiling, guard the
other filters.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pypdf import PasswordType, PdfReader, apply_configuration
from pypdf.errors import DependencyError, LimitReachedError

from ..errors import DocumentTooLarge, EmptyDocument, EncryptedDocument
from .base import LoadedDocument, Section, TextBudget, title_from_text
from .inflate import InflateBudget, InflateLimits, count_inflated, current_limits

log = logging.getLogger(__name__)

MAX_PAGES = 5000
_MAX_OUTLINE_ITEMS = 10_000
_MAX_OUTLINE_DEPTH = 8
_JUNK_TITLES = ("", "untitled")


def _open(path: Path, data: bytes) -> PdfReader:
    """The reader, unlocked when the file opens without a password (owner-only protection)."""
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
            raise EncryptedDocument(f"{path.name}: the PDF is encrypted with a password")
    except DependencyError as exc:  # AES without the optional 'cryptography' package
        raise EncryptedDocument(f"{path.name}: the PDF is encrypted ({exc})") from exc
    return reader


def _outline_starts(path: Path, reader: PdfReader) -> list[tuple[int, str]]:
    """(first page, heading path) for each outline entry, in page order."""
    starts: list[tuple[int, str]] = []

    def walk(items: Sequence[Any], parents: list[str]) -> None:
        title = ""
        for item in items:
            if len(starts) >= _MAX_OUTLINE_ITEMS:
                return
            if isinstance(item, list):  # the children of the entry just before
                if title and len(parents) < _MAX_OUTLINE_DEPTH:
                    walk(item, [*parents, title])
                continue
            title = " ".join(str(item.title or "").split())
            page = reader.get_destination_page_number(item)
            if title and page is not None and page >= 0:
                starts.append((page + 1, " > ".join([*parents, title])))

    try:
        walk(reader.outline, [])
    except Exception as exc:  # noqa: BLE001 - the outline only adds headings; the text stands
        log.info("%s: outline ignored (%s)", path.name, exc)
        return []
    return sorted(starts, key=lambda start: start[0])


def _heading_per_page(starts: list[tuple[int, str]], pages: int) -> list[str]:
    headings = [""] * (pages + 1)
    current, i = "", 0
    for page in range(1, pages + 1):
        while i < len(starts) and starts[i][0] <= page:
            current = starts[i][1]
            i += 1
        headings[page] = current
    return headings


def _metadata_title(reader: PdfReader) -> str:
    try:
        title = " ".join((reader.metadata.title or "").split()) if reader.metadata else ""
    except Exception:  # noqa: BLE001 - a damaged info dictionary only loses the title
        return ""
    # Word's PDF export often leaves "Microsoft Word - file.docx" as the title.
    junk = (title.lower() in _JUNK_TITLES or title.startswith("Microsoft Word - ")
            or sum(c.isalpha() for c in title) < 3)
    return "" if junk else title


def _flate_streams(page: Any) -> list[Any]:
    """The page's content streams and form XObjects whose only filter is FlateDecode (what
    pypdf decodes to read the page's text), with their raw bytes."""
    found: list[Any] = []
    contents = page.get("/Contents")
    contents = contents.get_object() if contents is not None else None
    candidates = list(contents) if isinstance(contents, list) else [contents]
    resources = page.get("/Resources")
    xobjects = resources.get_object().get("/XObject") if resources is not None else None
    if xobjects is not None:
        candidates.extend(xobjects.get_object().values())
    for candidate in candidates:
        stream = candidate.get_object() if candidate is not None else None
        # _data is pypdf's raw (still encoded) stream; without it pypdf's limits stand alone.
        if isinstance(getattr(stream, "_data", None), bytes) and \
                stream.get("/Filter") == "/FlateDecode":
            found.append(stream)
    return found


def _pypdf_limits(limits: InflateLimits) -> dict[str, int]:
    """pypdf's per-stream output limits, all set to our per-part ceiling."""
    part = limits.part_bytes
    return {"zlib_maximum_output_length": part, "lzw_maximum_output_length": part,
            "run_length_maximum_output_length": part, "brotli_maximum_output_length": part,
            "array_based_stream_maximum_output_length": part,
            "stream_decoding_work_maximum_length": part, "image_maximum_buffer_size": part,
            "jbig2_maximum_output_length": part}


def load_pdf(path: Path, data: bytes) -> LoadedDocument:
    limits = current_limits()
    try:
        with apply_configuration(**_pypdf_limits(limits)):
            return _load_pdf(path, data, InflateBudget(path, limits))
    except LimitReachedError as exc:
        raise DocumentTooLarge(f"{path.name}: a stream inflates past the "
                               f"{limits.part_bytes // 2**20} MB limit ({exc})") from None


def _load_pdf(path: Path, data: bytes, inflated: InflateBudget) -> LoadedDocument:
    reader = _open(path, data)
    count = len(reader.pages)
    if count > MAX_PAGES:
        raise DocumentTooLarge(f"{path.name}: {count} pages, over the {MAX_PAGES} page limit")
    headings = _heading_per_page(_outline_starts(path, reader), count)
    budget = TextBudget(path)
    sections: list[Section] = []
    for number, page in enumerate(reader.pages, start=1):
        for stream in _flate_streams(page):
            inflated.add(f"a stream of page {number}",
                         count_inflated(stream._data, inflated.limits.part_bytes))
        text = budget.take(page.extract_text().replace("\x00", "")).strip()
        if text:
            sections.append(Section(headings[number], number, text))
    if not sections:
        raise EmptyDocument(f"{path.name}: the PDF has no text layer (a scan?); "
                            "OCR is not supported")
    title = _metadata_title(reader) or title_from_text(path, sections[0].text)
    return LoadedDocument(title, "pdf", sections)
