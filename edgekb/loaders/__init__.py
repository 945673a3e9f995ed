"""Documents -> titled sections of plain text, one loader per format.

A loader returns the document's title and its sections, each with the heading path or page a
citation needs ("Safety > Lockout", "p. 12"). Loaders are blocking and run off the event loop.
Every failure is a typed IngestError: the parsers below us raise anything on hostile input, so
load_document is the boundary where that becomes CorruptDocument.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CorruptDocument, EmptyDocument, IngestError, UnsupportedFormat
from .base import LoadedDocument, Loader, Section
from .docx import load_docx
from .html import load_html
from .inflate import InflateLimits, applied
from .pdf import load_pdf
from .text import load_markdown, load_text

__all__ = ["LOADERS", "InflateLimits", "LoadedDocument", "Loader", "Section", "load_document",
           "supported"]

LOADERS: dict[str, Loader] = {
    ".txt": load_text,
    ".text": load_text,
    ".md": load_markdown,
    ".markdown": load_markdown,
    ".pdf": load_pdf,
    ".docx": load_docx,
    ".html": load_html,
    ".htm": load_html,
}


def supported(path: Path) -> bool:
    return path.suffix.lower() in LOADERS


def load_document(path: Path, data: bytes,
                  limits: InflateLimits | None = None) -> LoadedDocument:
    """``limits``: the decompression ceilings for DOCX parts and PDF streams (the defaults of
    inflate.py when None)."""
    suffix = path.suffix.lower()
    loader = LOADERS.get(suffix)
    if loader is None:
        known = ", ".join(sorted(LOADERS))
        raise UnsupportedFormat(f"{path.name}: unsupported format (supported: {known})")
    try:
        with applied(limits):
            document = loader(path, data)
    except IngestError:
        raise
    except Exception as exc:  # pypdf, python-docx and zipfile raise many kinds on bad input
        raise CorruptDocument(f"{path.name}: damaged or not a {suffix[1:].upper()} file "
                              f"({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not any(s.text.strip() for s in document.sections):
        raise EmptyDocument(f"{path.name}: no text found")
    return document
