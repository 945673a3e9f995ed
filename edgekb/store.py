"""SQLite store of documents and chunks.

``Store`` is blocking and owns one connection; it is used from one thread at a time.
``AsyncStore`` gives the event loop a single writer thread (SQLite allows one writer; queuing
writes on one thread avoids lock waits) and a small pool of readers, each with its own connection.
WAL with synchronous=FULL: an acknowledged write survives power loss.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from .errors import EdgekbError
from .migrations import migrate

T = TypeVar("T")

_KB_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


class InvalidKbName(EdgekbError):
    code = "invalid_kb"


def check_kb_name(name: str) -> str:
    """Knowledge base names are short slugs: they name files and appear in URLs."""
    if not isinstance(name, str) or not _KB_NAME.fullmatch(name):
        raise InvalidKbName(f"knowledge base name {name!r}: use 1-32 of a-z 0-9 _ -,"
                            " starting with a letter or digit")
    return name


@dataclass(frozen=True)
class NewChunk:
    heading: str
    page: int | None
    text: str
    token_count: int


@dataclass(frozen=True)
class ChunkHit:
    """A stored chunk with what a citation needs."""

    id: int
    kb: str
    doc_path: str
    title: str
    heading: str
    page: int | None
    text: str
    ord: int = 0          # position of the chunk in its document


@dataclass(frozen=True)
class DocumentRow:
    id: int
    kb: str
    path: str
    title: str
    sha256: str
    chunk_count: int


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    migrate(conn)
    return conn


# A document's rows are written in transactions of at most this many chunks: the one writer
# thread also stores live answer events, which must not wait behind a 3,000-chunk manual.
CHUNKS_PER_TRANSACTION = 64
_DOC_COLUMNS = "id, kb, path, title, sha256, chunk_count"


class Store:
    """Documents are published whole: a new version is written as ``staging`` in small
    transactions while the old one stays searchable, then one small transaction makes it
    ``ready`` and the old one ``retired``, whose rows are then deleted in small transactions.
    Only ``ready`` documents exist for readers; start-up purges what a crash left behind."""

    def __init__(self, path: Path, read_only: bool = False,
                 conn: sqlite3.Connection | None = None) -> None:
        self.conn = conn if conn is not None else connect(path)
        if read_only:  # a reader beside the one writer: a write through it is a bug
            self.conn.execute("PRAGMA query_only=ON")

    @classmethod
    def inspect(cls, path: Path) -> Store:
        """The database as found: opened read-only and never migrated (``edgekb doctor``
        checks the schema it finds, beside a running server)."""
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True,
                               check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=10000")
        return cls(path, conn=conn)

    def close(self) -> None:
        self.conn.close()

    def document(self, kb: str, path: str) -> DocumentRow | None:
        row = self.conn.execute(
            f"SELECT {_DOC_COLUMNS} FROM documents WHERE kb=? AND path=? AND state='ready'",
            (kb, path)).fetchone()
        return DocumentRow(*row) if row else None

    def document_by_id(self, doc_id: int) -> DocumentRow | None:
        if not 0 < doc_id < 1 << 63:
            return None  # SQLite integers stop there: a bigger id names nothing
        row = self.conn.execute(
            f"SELECT {_DOC_COLUMNS} FROM documents WHERE id=? AND state='ready'",
            (doc_id,)).fetchone()
        return DocumentRow(*row) if row else None

    def documents(self, kb: str | None = None) -> list[DocumentRow]:
        sql = f"SELECT {_DOC_COLUMNS} FROM documents WHERE state='ready'"
        rows = self.conn.execute(sql + " AND kb=? ORDER BY path", (kb,)) if kb else \
            self.conn.execute(sql + " ORDER BY kb, path")
        return [DocumentRow(*r) for r in rows]

    def replace_document(
        self, kb: str, path: str, title: str, fmt: str, sha256: str, size: int,
        chunks: Sequence[NewChunk], vectors: np.ndarray,
    ) -> tuple[list[int], list[int]]:
        """Store a document and its chunks, replacing any earlier version; readers see the
        old version or the new one, never a part. Returns (ids of the removed chunks, ids of
        the new chunks) for the index to follow."""
        assert len(chunks) == len(vectors)
        with self.transaction():
            self._purge_unpublished(kb, path)
            doc_id = self.conn.execute(
                "INSERT INTO documents (kb, path, title, format, sha256, size, chunk_count,"
                " ingested_at, state) VALUES (?,?,?,?,?,?,?,?,'staging')",
                (kb, path, title, fmt, sha256, size, len(chunks), time.time()),
            ).lastrowid
        added: list[int] = []
        for start in range(0, len(chunks), CHUNKS_PER_TRANSACTION):
            with self.transaction():
                for ord_ in range(start, min(len(chunks), start + CHUNKS_PER_TRANSACTION)):
                    chunk = chunks[ord_]
                    added.append(self.conn.execute(
                        "INSERT INTO chunks (doc_id, ord, heading, page, text, token_count,"
                        " vector) VALUES (?,?,?,?,?,?,?)",
                        (doc_id, ord_, chunk.heading, chunk.page, chunk.text, chunk.token_count,
                         np.asarray(vectors[ord_], dtype=np.float32).tobytes())).lastrowid)
        with self.transaction():
            old = self.document(kb, path)
            if old:
                self.conn.execute("UPDATE documents SET state='retired' WHERE id=?", (old.id,))
            self.conn.execute("UPDATE documents SET state='ready' WHERE id=?", (doc_id,))
        removed = self._delete_rows(old.id) if old else []
        return removed, added

    def delete_document(self, kb: str, path: str) -> list[int]:
        """Remove a document; returns the ids of its chunks."""
        with self.transaction():
            old = self.document(kb, path)
            if old is None:
                return []
            self.conn.execute("UPDATE documents SET state='retired' WHERE id=?", (old.id,))
        return self._delete_rows(old.id)

    def purge_unpublished(self) -> int:
        """Start-up: delete what an interrupted ingest left (staging and retired versions)."""
        ids = [r[0] for r in self.conn.execute(
            "SELECT id FROM documents WHERE state != 'ready'")]
        for doc_id in ids:
            self._delete_rows(doc_id)
        return len(ids)

    def _purge_unpublished(self, kb: str, path: str) -> None:
        for (doc_id,) in self.conn.execute("SELECT id FROM documents WHERE kb=? AND path=? AND"
                                           " state != 'ready'", (kb, path)).fetchall():
            self.conn.execute("DELETE FROM chunks WHERE doc_id=?", (doc_id,))
            self.conn.execute("DELETE FROM documents WHERE id=?", (doc_id,))

    def _delete_rows(self, doc_id: int) -> list[int]:
        """Delete an unpublished document's chunks in small transactions, then the row."""
        removed = self._chunk_ids(doc_id)
        for start in range(0, len(removed), CHUNKS_PER_TRANSACTION * 4):
            batch = removed[start : start + CHUNKS_PER_TRANSACTION * 4]
            with self.transaction():
                self.conn.executemany("DELETE FROM chunks WHERE id=?", [(i,) for i in batch])
        with self.transaction():
            self.conn.execute("DELETE FROM documents WHERE id=?", (doc_id,))
        return removed

    def chunks(self, ids: Sequence[int]) -> dict[int, ChunkHit]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.conn.execute(
            "SELECT c.id, d.kb, d.path, d.title, c.heading, c.page, c.text, c.ord FROM chunks c"
            f" JOIN documents d ON d.id = c.doc_id WHERE c.id IN ({marks}) AND d.state='ready'",
            list(ids),
        )
        return {r[0]: ChunkHit(*r) for r in rows}

    def chunk_vectors(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.conn.execute(f"SELECT id, vector FROM chunks WHERE id IN ({marks})", list(ids))
        return {r[0]: np.frombuffer(r[1], dtype=np.float32) for r in rows}

    def kbs(self) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT DISTINCT kb FROM documents WHERE state='ready' ORDER BY kb")]

    def chunk_count(self, kb: str) -> int:
        return self.conn.execute(
            "SELECT count(*) FROM chunks c JOIN documents d ON d.id = c.doc_id WHERE d.kb=?"
            " AND d.state='ready'", (kb,)).fetchone()[0]

    def chunk_ids(self, kb: str) -> list[int]:
        return [r[0] for r in self.conn.execute(
            "SELECT c.id FROM chunks c JOIN documents d ON d.id = c.doc_id WHERE d.kb=?"
            " AND d.state='ready' ORDER BY c.id", (kb,))]

    def vectors(self, kb: str, batch: int = 2048) -> Iterator[tuple[list[int], np.ndarray]]:
        """A knowledge base's stored vectors in id order, a bounded batch at a time."""
        last = 0
        while True:
            rows = self.conn.execute(
                "SELECT c.id, c.vector FROM chunks c JOIN documents d ON d.id = c.doc_id"
                " WHERE d.kb=? AND d.state='ready' AND c.id > ? ORDER BY c.id LIMIT ?",
                (kb, last, batch)).fetchall()
            if not rows:
                return
            yield [r[0] for r in rows], np.stack(
                [np.frombuffer(r[1], dtype=np.float32) for r in rows])
            last = rows[-1][0]

    def chunk_texts(self, kb: str, batch: int = 256
                    ) -> Iterator[list[tuple[int, str, str, str]]]:
        """(id, title, heading, text) of a knowledge base's chunks, a bounded batch at a time."""
        last = 0
        while True:
            rows = self.conn.execute(
                "SELECT c.id, d.title, c.heading, c.text FROM chunks c JOIN documents d"
                " ON d.id = c.doc_id WHERE d.kb=? AND d.state='ready' AND c.id > ?"
                " ORDER BY c.id LIMIT ?", (kb, last, batch)).fetchall()
            if not rows:
                return
            yield rows
            last = rows[-1][0]

    def set_vectors(self, pairs: Sequence[tuple[int, np.ndarray]]) -> None:
        with self.transaction():
            self.conn.executemany("UPDATE chunks SET vector=? WHERE id=?", [
                (np.asarray(v, dtype=np.float32).tobytes(), i) for i, v in pairs])

    def keyword_search(self, kb: str, match: str, k: int, trigram: bool = False
                       ) -> list[tuple[int, float]]:
        """(chunk id, BM25 score where higher is better) for an FTS5 MATCH expression."""
        table = "chunks_trigram" if trigram else "chunks_fts"
        try:
            rows = self.conn.execute(
                f"SELECT f.rowid, -bm25({table}) FROM {table} f"
                " JOIN chunks c ON c.id = f.rowid JOIN documents d ON d.id = c.doc_id"
                f" WHERE {table} MATCH ? AND d.kb = ? AND d.state='ready'"
                f" ORDER BY bm25({table}) LIMIT ?", (match, kb, k)).fetchall()
        except sqlite3.OperationalError:
            return []  # a query FTS5 cannot parse finds nothing, it does not fail the answer
        return [(r[0], r[1]) for r in rows]

    def keyword_scores(self, match: str, ids: Sequence[int]) -> dict[int, float]:
        """BM25 (higher is better) of these chunks for an FTS5 MATCH expression, scored on the
        whole table's statistics, as keyword_search scores its matches; a chunk that does not
        match is left out."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        try:
            rows = self.conn.execute(
                f"SELECT rowid, -bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ?"
                f" AND rowid IN ({marks})", (match, *ids)).fetchall()
        except sqlite3.OperationalError:
            return {}
        return {r[0]: r[1] for r in rows}

    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    def _chunk_ids(self, doc_id: int) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT id FROM chunks WHERE doc_id=?"
                                                " ORDER BY id", (doc_id,))]

    def transaction(self) -> _Transaction:
        return _Transaction(self.conn)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error (the connection is in autocommit mode)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


class AsyncStore:
    """The store seen from the event loop: one writer thread, a few reader threads."""

    def __init__(self, path: Path, readers: int = 2) -> None:
        self.path = path
        self._writer_pool = ThreadPoolExecutor(1, thread_name_prefix="db-write")
        self._reader_pool = ThreadPoolExecutor(readers, thread_name_prefix="db-read")
        self._writer: Store | None = None
        self._local = threading.local()
        self._readers: list[Store] = []
        self._readers_lock = threading.Lock()

    async def write(self, fn: Callable[[Store], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._writer_pool, lambda: fn(self._writer_store()))

    def write_from_thread(self, fn: Callable[[Store], T]) -> T:
        """``write`` for a worker thread (never the event loop): ingest's writes go through
        the same single writer as the live answers' events, so neither waits on SQLite's
        lock; they only queue behind each other's small transactions."""
        return self._writer_pool.submit(lambda: fn(self._writer_store())).result()

    async def read(self, fn: Callable[[Store], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._reader_pool, lambda: fn(self._reader_store()))

    def close(self) -> None:
        self._writer_pool.shutdown(wait=True)
        self._reader_pool.shutdown(wait=True)
        for store in [*self._readers, *([self._writer] if self._writer else [])]:
            store.close()

    def _writer_store(self) -> Store:
        if self._writer is None:
            self._writer = Store(self.path)
        return self._writer

    def _reader_store(self) -> Store:
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = Store(self.path, read_only=True)
            with self._readers_lock:
                self._readers.append(store)
        return store
