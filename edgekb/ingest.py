"""Files -> chunks -> vectors -> SQLite and the index, one document per transaction.

Blocking; the CLI calls it directly and the server from a thread. A document is stored whole or
not at all (one SQLite transaction), the index follows SQLite and is saved atomically at the end
of a batch; if the process dies in between, start-up rebuilds the index from SQLite.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .chunking import chunk_sections
from .embed import Embedder
from .errors import DocumentTooLarge, EdgekbError, IngestError
from .index import Library
from .loaders import load_document, supported
from .store import Store, check_kb_name

log = logging.getLogger(__name__)

DEFAULT_KB = "default"


@dataclass(frozen=True)
class FileResult:
    path: str
    status: str            # added | updated | unchanged | removed | failed
    chunks: int = 0
    error: str = ""
    code: str = ""


@dataclass
class IngestReport:
    results: list[FileResult] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def chunks(self) -> int:
        return sum(r.chunks for r in self.results)


def expand_paths(paths: Iterable[Path]) -> Iterator[Path]:
    """Files as given, and the supported files under each directory, in a stable order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and supported(p)
                              and not any(part.startswith(".") for part in p.parts))
        else:
            yield path


def embedding_text(title: str, heading: str, text: str) -> str:
    """What gets embedded: the title and heading path tell the embedder what a chunk is about."""
    context = " > ".join(part for part in (title, heading) if part)
    return f"{context}\n{text}" if context else text


class Ingestor:
    def __init__(self, store: Store, embedder: Embedder, library: Library, *,
                 chunk_tokens: int, overlap_tokens: int, max_file_bytes: int) -> None:
        self.store = store
        self.embedder = embedder
        self.library = library
        self.chunk_tokens = chunk_tokens
        self.overlap_tokens = overlap_tokens
        self.max_file_bytes = max_file_bytes

    def ingest(self, paths: Iterable[Path], kb: str = DEFAULT_KB,
               on_file: Callable[[FileResult], None] | None = None,
               force: bool = False) -> IngestReport:
        """Add or update the given files; a folder is synchronised (its deleted files removed).

        ``force`` re-ingests unchanged files too (after a change of embedder or chunking).
        """
        check_kb_name(kb)
        paths = [p.resolve() for p in paths]
        report = IngestReport()
        seen: set[str] = set()
        for path in expand_paths(paths):
            seen.add(str(path))
            self._record(report, self._ingest_file(path, kb, force), on_file)
        for folder in (p for p in paths if p.is_dir()):
            for doc in self.store.documents(kb):
                if doc.path.startswith(f"{folder}/") and doc.path not in seen:
                    self._record(report, self.remove(kb, doc.path), on_file)
        if any(r.status != "unchanged" and r.status != "failed" for r in report.results):
            self.library.get(kb).save(self.store)
        return report

    def remove(self, kb: str, path: str) -> FileResult:
        """Forget a document; the caller saves the index."""
        removed = self.store.delete_document(kb, path)
        self.library.get(kb).remove(removed)
        return FileResult(path, "removed", len(removed))

    @staticmethod
    def _record(report: IngestReport, result: FileResult,
                on_file: Callable[[FileResult], None] | None) -> None:
        report.results.append(result)
        if on_file:
            on_file(result)

    def _ingest_file(self, path: Path, kb: str, force: bool) -> FileResult:
        try:
            if not path.is_file():
                raise IngestError(f"{path}: no such file")
            size = path.stat().st_size
            if size > self.max_file_bytes:
                raise DocumentTooLarge(
                    f"{path.name}: {size} bytes, over the limit of {self.max_file_bytes}")
            data = path.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            existing = self.store.document(kb, str(path))
            if existing and existing.sha256 == sha and not force:
                return FileResult(str(path), "unchanged", existing.chunk_count)
            document = load_document(path, data)
            chunks = chunk_sections(document.sections, self.embedder.count_tokens,
                                    self.chunk_tokens, self.overlap_tokens)
            vectors = self.embedder.embed_batch(
                [embedding_text(document.title, c.heading, c.text) for c in chunks])
            removed, added = self.store.replace_document(
                kb, str(path), document.title, document.format, sha, len(data), chunks, vectors)
        except EdgekbError as exc:
            log.warning("ingest failed: %s", exc.message)
            return FileResult(str(path), "failed", error=exc.message, code=exc.code)
        except OSError as exc:
            return FileResult(str(path), "failed", error=f"{path}: {exc.strerror}", code="io_error")
        index = self.library.get(kb)
        index.remove(removed)
        index.add(added, vectors)
        return FileResult(str(path), "updated" if existing else "added", len(chunks))
