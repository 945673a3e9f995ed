"""DOCX -> sections under their Heading 1..6 path; tables kept one whole row per line.

The zip is checked before python-docx opens it: python-docx reads every part into memory through
zipfile, which inflates a member whole before comparing it with its declared size. So every
member is first inflated in bounded steps that count the bytes it really produces (inflate.py),
against the per-part and per-document ceilings; only an archive whose members all produce what
they declare, within both, reaches python-docx.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import docx
from docx.styles.style import BaseStyle
from docx.table import Table, _Cell

from ..errors import CorruptDocument, DocumentTooLarge
from .base import (LoadedDocument, Outline, TextBudget, clean_heading, clean_title, is_furniture,
                   stem_title, table_row)
from .inflate import InflateBudget, current_limits, verify_zip_members

MAX_MEMBERS = 10_000
_EOCD = b"PK\x05\x06"
_EOCD_WINDOW = 22 + 65_535  # the end record and the longest zip comment
_HEADING_STYLE = re.compile(r"heading ([1-6])", re.IGNORECASE)
_TITLE = 0                  # the level given to the Title style


def _declared_members(path: Path, data: bytes) -> int:
    """Member count from the end record, read before zipfile builds an object per member."""
    end = data.rfind(_EOCD, max(0, len(data) - _EOCD_WINDOW))
    if end < 0 or len(data) < end + 12:
        raise CorruptDocument(f"{path.name}: not a DOCX file (not a zip archive)")
    return int.from_bytes(data[end + 10:end + 12], "little")


def _check_package(path: Path, data: bytes) -> None:
    """Refuse zip bombs and non-Word zips before python-docx reads anything."""
    if _declared_members(path, data) > MAX_MEMBERS:
        raise DocumentTooLarge(f"{path.name}: more than {MAX_MEMBERS} parts in the archive")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
        raise CorruptDocument(f"{path.name}: not a DOCX file ({exc})") from exc
    if len(members) > MAX_MEMBERS:
        raise DocumentTooLarge(f"{path.name}: more than {MAX_MEMBERS} parts in the archive")
    for member in members:
        # Word writes only stored and deflated parts; bzip2 and lzma are refused rather than
        # given a bounded inflater of their own.
        if member.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CorruptDocument(f"{path.name}: {member.filename} uses an unsupported "
                                  "compression method")
    if "word/document.xml" not in {member.filename for member in members}:
        raise CorruptDocument(f"{path.name}: not a Word document (no word/document.xml)")
    limits = current_limits()
    declared = sum(member.file_size for member in members)
    if declared > limits.document_bytes:  # an honest big archive: refused without inflating
        raise DocumentTooLarge(f"{path.name}: unpacks to {declared // 2**20} MB, over the "
                               f"{limits.document_bytes // 2**20} MB limit (a zip bomb?)")
    verify_zip_members(path, data, members, InflateBudget(path, limits))


def _style_level(style: BaseStyle | None) -> int | None:
    """Heading level of a style or of the style it is based on; _TITLE for Title."""
    for _ in range(10):  # base_style chains are short; a cyclic one must not hang
        if style is None:
            return None
        name = style.name or ""
        if name.lower() == "title":
            return _TITLE
        match = _HEADING_STYLE.fullmatch(name)
        if match:
            return int(match.group(1))
        style = style.base_style
    return None


def _rows(table: Table) -> Iterator[str]:
    """Each row as one line. A vertically merged cell repeats its text in every row it spans,
    so a row read alone is still whole. Read from the XML: python-docx's row.cells walks up
    the rows for each merged cell, which is quadratic on long merged tables."""
    above: dict[int, str] = {}  # grid column -> cell text in the row above
    for tr in table._tbl.tr_lst:
        column, cells, texts = tr.grid_before, [], {}
        for tc in tr.tc_lst:
            text = above.get(column, "") if tc.vMerge == "continue" else _Cell(tc, table).text
            texts[column] = text
            cells.append(text)
            column += tc.grid_span
        above = texts
        if any(cell.strip() for cell in cells):
            yield table_row(cells)


def load_docx(path: Path, data: bytes) -> LoadedDocument:
    _check_package(path, data)
    document = docx.Document(io.BytesIO(data))
    budget = TextBudget(path)
    outline = Outline()
    title = " ".join((document.core_properties.title or "").split())
    first_heading = ""
    levels: dict[str | None, int | None] = {}  # style id -> level; style lookups are linear
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            outline.add("")  # a table is a paragraph of its own
            for row in _rows(block):
                outline.add(budget.take(row))
            outline.add("")
            continue
        text = block.text.strip()
        if not text:
            continue
        style_id = block._p.style
        if style_id not in levels:
            levels[style_id] = _style_level(block.style)
        level = levels[style_id]
        if level is None:
            outline.add(budget.take(text))
            outline.add("")  # keeps a label line from running into the next sentence
        elif level == _TITLE:
            title = title or " ".join(text.split())
        else:
            if level == 1 and not first_heading:
                first_heading = " ".join(text.split())
            outline.heading(level, budget.take(clean_heading(text)))
    outline.flush()
    sections = [s for s in outline.sections if not is_furniture(s)] or outline.sections
    return LoadedDocument(clean_title(title or first_heading) or stem_title(path), "docx",
                          sections)

