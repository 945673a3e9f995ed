"""The store and the index on their own: schema versions, whole-document publishing, searches
during an index save, and the embedder's identity."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
from pathlib import Path

import hnswlib
import numpy as np
import pytest
from conftest import edgekb_env, run_edgekb

from edgekb import store as store_module
from edgekb.errors import EmbedderMismatch, SchemaTooNew
from edgekb.index import VectorIndex
from edgekb.migrations import MIGRATIONS
from edgekb.store import NewChunk, Store


def chunks(n: int, word: str) -> tuple[list[NewChunk], np.ndarray]:
    rng = np.random.default_rng(n)
    vectors = rng.normal(size=(n, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [NewChunk("", None, f"{word} part {i}", 3) for i in range(n)], vectors


def test_a_data_dir_written_by_a_newer_edgekb_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "edgekb.db"
    Store(db).close()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(SchemaTooNew):
        Store(db)
    result = run_edgekb(["serve", "--data-dir", str(tmp_path), "--port", "0"], edgekb_env(
        tmp_path / "no-models"), timeout=60)
    assert result.returncode == 2 and "schema_too_new" in result.stderr, result.stderr


def test_a_schema_3_data_dir_migrates_with_its_documents(tmp_path: Path) -> None:
    db = tmp_path / "edgekb.db"
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        for number, script in enumerate(MIGRATIONS[:3], start=1):
            conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")
        conn.execute("INSERT INTO documents (id, kb, path, title, format, sha256, size,"
                     " chunk_count, ingested_at) VALUES (7, 'default', '/m.md', 'M', 'md', 'x',"
                     " 1, 1, 0)")
        conn.execute("INSERT INTO chunks (id, doc_id, ord, heading, page, text, token_count,"
                     " vector) VALUES (70, 7, 0, 'Reset', NULL, 'press the reset key', 4, x'00')")
    store = Store(db)
    try:
        assert [d.id for d in store.documents()] == [7]
        assert store.keyword_search("default", '"reset"', 5) and store.chunk_ids("default") == [70]
        removed, added = store.replace_document("default", "/m.md", "M", "md", "y", 1,
                                                *chunks(2, "valve"))
        assert removed == [70] and len(added) == 2
        assert not store.keyword_search("default", '"reset"', 5), "FTS kept a deleted chunk"
    finally:
        store.close()


def test_readers_see_the_old_document_or_the_new_one_never_a_part(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "CHUNKS_PER_TRANSACTION", 4)
    db = tmp_path / "edgekb.db"
    writer, reader = Store(db), Store(db)
    try:
        writer.replace_document("default", "/m.md", "M", "md", "a", 1, *chunks(10, "old"))
        seen: list[tuple[int, int]] = []
        commit = store_module._Transaction.__exit__

        def look_after_commit(self, exc_type, *rest):  # type: ignore[no-untyped-def]
            commit(self, exc_type, *rest)
            texts = [h.text for h in reader.chunks(reader.chunk_ids("default")).values()]
            seen.append((sum(t.startswith("old") for t in texts),
                         sum(t.startswith("new") for t in texts)))

        monkeypatch.setattr(store_module._Transaction, "__exit__", look_after_commit)
        writer.replace_document("default", "/m.md", "M", "md", "b", 1, *chunks(25, "new"))
    finally:
        writer.close()
        reader.close()
    assert len(seen) >= 8, "the new version was not written in small transactions"
    assert set(seen) <= {(10, 0), (0, 25)}, f"a reader saw part of a document: {seen}"
    assert seen[-1] == (0, 25)


def test_saving_the_index_never_holds_up_a_search(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    index = VectorIndex(8, tmp_path / "index.bin", "default")
    _, vectors = chunks(200, "x")
    index.add(list(range(1, 201)), vectors)
    writing = threading.Event()
    release = threading.Event()
    real_save = hnswlib.Index.save_index

    def slow_save(self, path):  # type: ignore[no-untyped-def]
        writing.set()  # a slow SD card: the file write takes as long as the test says
        release.wait(10)
        real_save(self, path)

    monkeypatch.setattr(hnswlib.Index, "save_index", slow_save)
    saver = threading.Thread(target=index.save, args=(lambda fn: None,))
    saver.start()
    try:
        assert writing.wait(10)
        found: list[list[tuple[int, float]]] = []
        searcher = threading.Thread(target=lambda: found.append(index.search(vectors[5], 3)))
        searcher.start()
        searcher.join(5)
        assert found and found[0][0][0] == 6, "a search waited for the index save"
    finally:
        release.set()
        saver.join(10)


def test_an_index_of_another_embedder_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "edgekb.db"
    store = Store(db)
    try:
        store.replace_document("default", "/m.md", "M", "md", "a", 1, *chunks(3, "x"))
        index = VectorIndex(8, tmp_path / "index.bin", "default", embedder="model-a (sha 1)")
        index.load_or_rebuild(store, lambda fn: fn(store))
        other = VectorIndex(8, tmp_path / "index.bin", "default", embedder="model-b (sha 2)")
        with pytest.raises(EmbedderMismatch) as refused:
            other.load_or_rebuild(store)
        assert "edgekb reindex" in refused.value.message
    finally:
        store.close()


def test_reindex_embeds_a_knowledge_base_again_after_an_embedder_change(
        tmp_path: Path, models_cache: Path) -> None:
    env = edgekb_env(models_cache)
    data = ["--data-dir", str(tmp_path / "data")]
    run_edgekb(["ingest", "--demo", *data], env, check=True)
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "edgekb.db")) as conn, conn:
        conn.execute("UPDATE meta SET value='another-embedder (sha256 0123)'"
                     " WHERE key='index.default.embedder'")
    refused = run_edgekb(["search", "reset the pump", *data], env)
    assert refused.returncode == 2 and "embedder_mismatch" in refused.stderr, refused.stderr
    redone = run_edgekb(["reindex", *data], env, check=True)
    assert re.search(r"default: [1-9]\d* chunks embedded", redone.stderr), redone.stderr
    found = run_edgekb(["search", "reset the pump after an overpressure trip", "--json", *data],
                       env, check=True)
    assert "pump-manual.md" in found.stdout.splitlines()[0]
