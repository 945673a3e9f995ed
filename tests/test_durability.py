"""Documents, chunks and vectors stay consistent through kill -9 at any point of an ingest, and
an index file that does not match SQLite is never trusted."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from conftest import edgekb_env, run_edgekb

from edgekb.config import load_settings
from edgekb.engines import load_embedder, open_catalog, open_library
from edgekb.store import Store

TOPICS = ["hydraulic pump", "air compressor", "belt conveyor", "boiler", "forklift",
          "robot arm", "chiller", "press brake", "cooling tower", "gearbox"]


def make_corpus(folder: Path, count: int, edition: int = 0) -> None:
    """``count`` manuals; another ``edition`` changes every file (so an ingest has them all
    to do again, however fast the machine)."""
    folder.mkdir(exist_ok=True)
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        sections = "\n\n".join(
            f"## Step {s}\n\nCheck the {topic} unit {i} part {s}: measure the pressure, "
            f"torque the bolts to {20 + s} Nm and record error code E-{100 + i}-{s}. " * 3
            for s in range(24))
        (folder / f"manual-{i:02d}.md").write_text(
            f"# {topic.title()} manual {i}, edition {edition}\n\n{sections}")


def check_consistent(data_dir: Path, models_cache: Path) -> tuple[int, str]:
    """SQLite is intact and self-consistent; the index matches it (loaded or rebuilt)."""
    db = sqlite3.connect(data_dir / "edgekb.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    # A `staging` version is invisible until published whole (a kill leaves one behind, and
    # the next start deletes it): every published document must be complete.
    mismatched = db.execute(
        "SELECT d.path FROM documents d WHERE d.state = 'ready' AND d.chunk_count !="
        " (SELECT count(*) FROM chunks c WHERE c.doc_id = d.id)").fetchall()
    assert mismatched == [], f"half-ingested documents: {mismatched}"
    chunks = db.execute("SELECT count(*) FROM chunks").fetchone()[0]
    assert db.execute("SELECT count(*) FROM chunks_fts").fetchone()[0] == chunks
    db.close()
    settings = load_settings(overrides={"data_dir": str(data_dir),
                                        "models.cache_dir": str(models_cache)}, env={})
    embedder = load_embedder(settings, open_catalog(settings))
    store = Store(settings.db_path)
    try:
        library = open_library(settings, embedder)
        outcome = library.get("default").load_or_rebuild(store)
        assert sorted(library.get("default")._ids) == store.chunk_ids("default")
    finally:
        store.close()
    return chunks, outcome


def test_kill_9_during_ingest_never_leaves_a_half_document(tmp_path: Path,
                                                           models_cache: Path) -> None:
    corpus = tmp_path / "corpus"
    data_dir = tmp_path / "data"
    env = edgekb_env(models_cache)
    rng = random.Random(7)
    outcomes = set()
    deadline = time.monotonic() + 240
    kills = 0
    for round_ in range(12):
        if time.monotonic() > deadline:
            break
        make_corpus(corpus, 24, edition=round_)  # every round has the whole corpus to ingest
        process = subprocess.Popen(
            [sys.executable, "-m", "edgekb", "ingest", str(corpus), "--data-dir", str(data_dir)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 4.0))  # start-up takes ~1 s: some kills land in it
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(timeout=30)
        if (data_dir / "edgekb.db").exists():
            _, outcome = check_consistent(data_dir, models_cache)
            outcomes.add(outcome)
    assert kills >= 6
    # A final run completes what the killed ones left, and everything is there.
    final = run_edgekb(["ingest", str(corpus), "--data-dir", str(data_dir)], env, check=True)
    assert "0 failed" in final.stderr
    chunks, _ = check_consistent(data_dir, models_cache)
    db = sqlite3.connect(data_dir / "edgekb.db")
    assert db.execute("SELECT count(*) FROM documents").fetchone()[0] == 24
    assert db.execute("SELECT count(*) FROM documents WHERE state != 'ready'").fetchone()[0] == 0
    db.close()
    assert chunks > 24


def test_corrupt_index_file_is_rebuilt_from_sqlite(tmp_path: Path, models_cache: Path) -> None:
    env = edgekb_env(models_cache)
    data_dir = tmp_path / "data"
    run_edgekb(["ingest", "--demo", "--data-dir", str(data_dir)], env, check=True)
    query = ["search", "reset the pump after an overpressure trip", "--data-dir", str(data_dir),
             "--json", "--mode", "vector"]
    before = run_edgekb(query, env, check=True).stdout
    index = data_dir / "index-default.bin"
    data = bytearray(index.read_bytes())
    data[len(data) // 3] ^= 0x55
    index.write_bytes(bytes(data))

    after = run_edgekb(query, env, check=True)
    assert "rebuilding the vector index" in after.stderr
    assert after.stdout == before
    # A writer (ingest) repairs the file on disk too: the next load trusts it again.
    run_edgekb(["ingest", "--demo", "--data-dir", str(data_dir)], env, check=True)
    again = run_edgekb(query, env, check=True)
    assert "rebuilding" not in again.stderr and again.stdout == before
