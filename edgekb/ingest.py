"""Files -> chunks -> vectors -> SQLite and the index.

Blocking; the CLI calls it directly and the server from its ingest thread. Every write goes
through ``write``: in the server that is the store's one writer thread, shared with the live
answers, so ingest never makes them wait on SQLite's lock. A document is published whole
(store.py); the index follows SQLite and is saved atomically at the end of a batch; if the
process dies in between, start-up rebuilds the index from SQLite.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .chunking import chunk_sections
from .embed import Embedder
from .errors import DocumentTooLarge, EdgekbError, IngestError
from .index import Library, Write, fsync_dir
from .loaders import LOADERS, load_document, supported
from .store import Store, check_kb_name

log = logging.getLogger(__name__)

DEFAULT_KB = "default"


class NoDocuments(EdgekbError):
    """A batch found nothing to ingest: never reported as a success."""

    code = "no_documents"


@dataclass(frozen=True)
class FileResult:
    path: str
    status: str            # added | updated | unchanged | removed | failed
    chunks: int = 0
    error: str = ""
    code: str = ""


# Told, per file, how many of its chunks are embedded: (path, done, total); (path, 0, None)
# when a file starts (reading and chunking it can take a while too).
Progress = Callable[[str, int, "int | None"], None]


@dataclass
class IngestReport:
    results: list[FileResult] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def chunks(self) -> int:
        return sum(r.chunks for r in self.results)


def _hidden(path: Path, root: Path) -> bool:
    """Hidden below ``root``: what lies above the folder the user named does not count
    (~/.local/share/manuals is a fine folder)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def expand_paths(paths: Iterable[Path]) -> Iterator[Path]:
    """Files as given, and the supported, not hidden files under each directory, in a stable
    order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and supported(p)
                              and not _hidden(p, path))
        else:
            yield path


def embedding_text(title: str, heading: str, text: str) -> str:
    """What gets embedded: the title and heading path tell the embedder what a chunk is about."""
    context = " > ".join(part for part in (title, heading) if part)
    return f"{context}\n{text}" if context else text


class Ingestor:
    def __init__(self, store: Store, embedder: Embedder, library: Library, *,
                 chunk_tokens: int, overlap_tokens: int, max_file_bytes: int,
                 write: Write | None = None) -> None:
        self.store = store  # for reads; writes go through ``write``
        self.write: Write = write or (lambda fn: fn(store))
        self.embedder = embedder
        self.library = library
        self.chunk_tokens = chunk_tokens
        self.overlap_tokens = overlap_tokens
        self.max_file_bytes = max_file_bytes
        self.on_progress: Progress | None = None

    def ingest(self, paths: Iterable[Path], kb: str = DEFAULT_KB,
               on_file: Callable[[FileResult], None] | None = None,
               force: bool = False) -> IngestReport:
        """Add or update the given files; a folder is synchronised: documents whose files are
        gone from it are removed (never those a filter merely stopped seeing).

        ``force`` re-ingests unchanged files too (after a change of embedder or chunking).
        Raises NoDocuments when the batch holds no document at all.
        """
        check_kb_name(kb)
        paths = [p.resolve() for p in paths]
        report = IngestReport()
        for path in expand_paths(paths):
            self._record(report, self._ingest_file(path, path, kb, force), on_file)
        for folder in (p for p in paths if p.is_dir()):
            for doc in self.store.documents(kb):
                if doc.path.startswith(f"{folder}/") and not Path(doc.path).exists():
                    self._record(report, self.remove(kb, doc.path), on_file)
        if not report.results:
            known = ", ".join(sorted(LOADERS))
            raise NoDocuments(f"no document found in {', '.join(map(str, paths))} (looked for "
                              f"{known}; hidden files and folders inside are skipped)")
        self._save_if_changed(kb, report)
        return report

    def ingest_upload(self, received: Path, target: Path, kb: str) -> FileResult:
        """Ingest an uploaded file kept at ``received`` as the document ``target``; the file
        takes its place only once it ingested, so a broken re-upload leaves the good version
        (file and chunks) as it was."""
        result = self._ingest_file(received, target, kb, force=False)
        if result.status == "failed":
            received.unlink(missing_ok=True)
        else:
            os.replace(received, target)
            fsync_dir(target.parent)
        return result

    def reembed(self, kb: str) -> int:
        """Embed every stored chunk of ``kb`` again with the configured embedder (after a
        change of embedder) and rebuild its index; the documents' files are not needed."""
        done = 0
        for rows in self.store.chunk_texts(kb):
            vectors = self.embedder.embed_batch(
                [embedding_text(title, heading, text) for _, title, heading, text in rows])
            pairs = [(row[0], vector) for row, vector in zip(rows, vectors)]
            self.write(lambda store: store.set_vectors(pairs))
            done += len(rows)
        self.library.get(kb).rebuild(self.store, self.write)
        return done

    def save_index(self, kb: str) -> None:
        self.library.get(kb).save(self.write)

    def remove(self, kb: str, path: str) -> FileResult:
        """Forget a document; the caller saves the index."""
        removed = self.write(lambda store: store.delete_document(kb, path))
        self.library.get(kb).remove(removed)
        return FileResult(path, "removed", len(removed))

    def _save_if_changed(self, kb: str, report: IngestReport) -> None:
        if any(r.status not in ("unchanged", "failed") for r in report.results):
            self.save_index(kb)

    @staticmethod
    def _record(report: IngestReport, result: FileResult,
                on_file: Callable[[FileResult], None] | None) -> None:
        report.results.append(result)
        if on_file:
            on_file(result)

    def _ingest_file(self, source: Path, path: Path, kb: str, force: bool) -> FileResult:
        """Read ``source`` and store it as the document ``path``."""
        try:
            if not source.is_file():
                raise IngestError(f"{path}: no such file")
            size = source.stat().st_size
            if size > self.max_file_bytes:
                raise DocumentTooLarge(
                    f"{path.name}: {size} bytes, over the limit of {self.max_file_bytes}")
            data = source.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            existing = self.store.document(kb, str(path))
            if existing and existing.sha256 == sha and not force:
                return FileResult(str(path), "unchanged", existing.chunk_count)
            report = self.on_progress
            if report is not None:
                report(str(path), 0, None)
            document = load_document(path, data)
            chunks = chunk_sections(document.sections, self.embedder.count_tokens,
                                    self.chunk_tokens, self.overlap_tokens)
            vectors = self.embedder.embed_batch(
                [embedding_text(document.title, c.heading, c.text) for c in chunks],
                None if report is None else lambda done: report(str(path), done, len(chunks)))
            removed, added = self.write(lambda store: store.replace_document(
                kb, str(path), document.title, document.format, sha, len(data), chunks,
                vectors))
        except EdgekbError as exc:
            log.warning("ingest failed: %s", exc.message)
            return FileResult(str(path), "failed", error=exc.message, code=exc.code)
        except OSError as exc:
            return FileResult(str(path), "failed", error=f"{path}: {exc.strerror}", code="io_error")
        index = self.library.get(kb)
        index.remove(removed)
        index.add(added, vectors)
        return FileResult(str(path), "updated" if existing else "added", len(chunks))

