"""The vector index: hnswlib in RAM, saved atomically, never trusted without its checksum.

hnswlib's own ``save_index`` overwrites in place without fsync, and a flipped byte in its file
usually loads silently. So we save to a temporary file, fsync, rename, fsync the directory, and
keep the file's sha256 and the set of its chunk ids (as a count and a digest) in SQLite; at
start-up a file that does not match is rebuilt from the vectors stored in SQLite, the source of
truth.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from .errors import EmbedderMismatch
from .store import Store

# Runs a function on the store's one writer (AsyncStore.write_from_thread, or directly on the
# CLI's only connection).
Write = Callable[[Callable[[Store], Any]], Any]

log = logging.getLogger(__name__)

M = 16
EF_CONSTRUCTION = 200
EF_SEARCH = 64


def ids_digest(ids: Iterable[int]) -> str:
    digest = hashlib.sha256()
    for chunk_id in sorted(ids):
        digest.update(chunk_id.to_bytes(8, "little"))
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ReadWriteLock:
    """Many readers or one writer. Searches and saves only read the graph, so a save (which
    writes a large file) never holds up a search; adding, removing and resizing write."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class VectorIndex:
    """Cosine index of chunk vectors labelled by chunk id; thread-safe (see ReadWriteLock).

    The embedder that made the vectors is recorded with the index (name and model sha256): an
    index built by another embedder is refused, since its vectors mean nothing to this one.
    """

    def __init__(self, dim: int, path: Path, kb: str, embedder: str = "") -> None:
        self.dim = dim
        self.path = path
        self.kb = kb
        self.embedder = embedder
        self._meta_file = f"index.{kb}.file_sha256"
        self._meta_ids = f"index.{kb}.ids_sha256"
        self._meta_embedder = f"index.{kb}.embedder"
        self._lock = ReadWriteLock()
        self._ids: set[int] = set()
        self._index = self._new_index(1024)

    def __len__(self) -> int:
        return len(self._ids)

    def _new_index(self, capacity: int) -> hnswlib.Index:
        index = hnswlib.Index(space="cosine", dim=self.dim)
        index.init_index(max_elements=capacity, M=M, ef_construction=EF_CONSTRUCTION,
                         allow_replace_deleted=True)
        index.set_ef(EF_SEARCH)
        return index

    def add(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        if not len(ids):
            return
        with self._lock.writing():
            needed = self._index.get_current_count() + len(ids)
            if needed > self._index.get_max_elements():
                self._index.resize_index(max(needed, 2 * self._index.get_max_elements()))
            self._index.add_items(np.asarray(vectors, dtype=np.float32), list(ids),
                                  replace_deleted=True)
            self._ids.update(ids)

    def remove(self, ids: Sequence[int]) -> None:
        with self._lock.writing():
            for label in ids:
                if label in self._ids:
                    self._index.mark_deleted(label)
                    self._ids.discard(label)

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(chunk id, cosine similarity), best first."""
        with self._lock.reading():
            k = min(k, len(self._ids))
            if k == 0:
                return []
            labels, distances = self._index.knn_query(np.asarray(vector, dtype=np.float32), k=k)
        return [(int(i), float(1.0 - d)) for i, d in zip(labels[0], distances[0])]

    def save(self, write: Write) -> None:
        """Write the index durably, then record its checksum, ids and embedder in SQLite
        (through ``write``: the one writer). Searches go on meanwhile."""
        tmp = self.path.with_suffix(".tmp")
        with self._lock.reading():
            self._index.save_index(str(tmp))
            ids = set(self._ids)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        # Recorded after the rename: a crash in between leaves a checksum that does not match,
        # which start-up treats as "rebuild", never as "trust". Hashed before the write, so
        # the writer thread (live answers' events) never waits on reading the file.
        meta = {self._meta_file: file_sha256(self.path), self._meta_ids: ids_digest(ids),
                self._meta_embedder: self.embedder}
        write(lambda store: _set_all(store, meta))

    def load_or_rebuild(self, store: Store, write: Write | None = None) -> str:
        """Load the saved index if it matches SQLite exactly; otherwise rebuild. Says which.

        Without ``write`` it rebuilds in memory only, for read-only users beside a running
        server. Vectors of another embedder are refused (EmbedderMismatch).
        """
        self._check_embedder(store)
        stored_ids = store.chunk_ids(self.kb)
        expected_ids = ids_digest(stored_ids)
        reason = self._try_load(store, stored_ids, expected_ids)
        if reason is None:
            return "loaded"
        log.warning("rebuilding the vector index of %r from SQLite: %s", self.kb, reason)
        self.rebuild(store, write)
        return "rebuilt"

    def _check_embedder(self, store: Store) -> None:
        recorded = store.meta(self._meta_embedder)
        if recorded and self.embedder and recorded != self.embedder:
            raise EmbedderMismatch(
                f"knowledge base {self.kb!r} was embedded with {recorded}, but the configured "
                f"embedder is {self.embedder}; run `edgekb reindex --kb {self.kb}` to embed "
                "it again, or configure the old embedder")

    def _try_load(self, store: Store, stored_ids: list[int], expected_ids: str) -> str | None:
        if not self.path.exists():
            return "no index file" if stored_ids else None
        if store.meta(self._meta_file) != file_sha256(self.path):
            return "index file checksum does not match"
        if store.meta(self._meta_ids) != expected_ids:
            return "index holds other chunks than SQLite"
        index = hnswlib.Index(space="cosine", dim=self.dim)
        index.load_index(str(self.path), allow_replace_deleted=True)
        index.set_ef(EF_SEARCH)
        with self._lock.writing():
            self._index = index
            self._ids = set(stored_ids)
        return None

    def rebuild(self, store: Store, write: Write | None = None) -> None:
        count = store.chunk_count(self.kb)
        with self._lock.writing():
            self._index = self._new_index(max(1024, count))
            self._ids = set()
        for ids, vectors in store.vectors(self.kb):
            self.add(ids, vectors)
        if write is not None:
            self.save(write)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _set_all(store: Store, values: dict[str, str]) -> None:
    with store.transaction():
        for key, value in values.items():
            store.set_meta(key, value)


class Library:
    """One vector index per knowledge base, each in its own file under the data dir."""

    def __init__(self, dim: int, data_dir: Path, embedder: str = "") -> None:
        self.dim = dim
        self.data_dir = data_dir
        self.embedder = embedder
        self._indexes: dict[str, VectorIndex] = {}
        self._lock = threading.Lock()

    def get(self, kb: str) -> VectorIndex:
        with self._lock:
            if kb not in self._indexes:
                self._indexes[kb] = VectorIndex(self.dim, self.data_dir / f"index-{kb}.bin", kb,
                                                self.embedder)
            return self._indexes[kb]

    def kbs(self) -> list[str]:
        with self._lock:
            return sorted(kb for kb, index in self._indexes.items() if len(index))

    def load(self, store: Store, write: Write | None = None) -> dict[str, str]:
        """Load (or rebuild) the index of every knowledge base SQLite knows; says which."""
        return {kb: self.get(kb).load_or_rebuild(store, write) for kb in store.kbs()}
