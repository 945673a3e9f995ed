"""`edgekb backup` and `edgekb restore` on real data dirs: a backup taken while the real server
answers restores to a data dir that answers the same questions; damaged or foreign archives and
non-empty targets are refused with nothing written; a schema migration keeps a backup first."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from conftest import (
    DEMO_QUESTION,
    Server,
    answer_text,
    collect,
    edgekb_env,
    receive_json,
    run_edgekb,
    sources_of,
    start_server,
)

from edgekb.backup import MANIFEST
from edgekb.migrations import MIGRATIONS

QUESTIONS = [DEMO_QUESTION, "What pressure does the pump relief valve open at?",
             "How often should the pump seals be inspected?"]


@pytest.fixture
def data_dir(tmp_path: Path, demo_data_dir: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(demo_data_dir, copy, ignore=shutil.ignore_patterns("edgekb.lock"))
    return copy


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir()) if data_dir.exists() else []


def test_round_trip_keeps_documents_keys_and_conversations(data_dir: Path, tmp_path: Path,
                                                           models_cache: Path) -> None:
    env = edgekb_env(models_cache)
    uploaded = data_dir / "docs" / "default" / "valve.md"
    uploaded.parent.mkdir(parents=True)
    uploaded.write_text("# Valve V-9\n\n## Opening\n\nTurn the handwheel left twice.\n")
    run_edgekb(["ingest", str(uploaded), "--data-dir", str(data_dir)], env, check=True)
    key = data_dir / "auth" / "keys.json"  # where the security layer keeps its signing keys
    key.parent.mkdir(mode=0o700)
    key.write_bytes(b'{"k": "secret"}')
    key.chmod(0o600)
    conn = sqlite3.connect(data_dir / "edgekb.db")
    conn.execute("INSERT INTO sessions (id, user, created_at, updated_at)"
                 " VALUES ('S1', 'u', 1.0, 2.0)")
    conn.execute("INSERT INTO requests VALUES ('S1', 'r1', 'q?', 'done', 1, 1.0)")
    conn.execute("INSERT INTO turns (session_id, request_id, question, answer, sources, finish,"
                 " created_at) VALUES ('S1', 'r1', 'q?', 'a.', '[]', 'stop', 2.0)")
    conn.commit()
    conn.close()

    archive = tmp_path / "b" / "edgekb.tar.gz"
    made = run_edgekb(["backup", str(archive), "--data-dir", str(data_dir)], env, check=True)
    assert "backup written" in made.stderr and archive.stat().st_mode & 0o077 == 0
    assert listing(archive.parent) == ["edgekb.tar.gz"]  # nothing temporary left beside it

    target = tmp_path / "restored"
    result = run_edgekb(["restore", str(archive), "--data-dir", str(target)], env, check=True)
    assert "indexes rebuilt (default: " in result.stderr
    assert sha256(target / "auth" / "keys.json") == sha256(key)
    assert (target / "auth" / "keys.json").stat().st_mode & 0o077 == 0
    assert (target / "auth").stat().st_mode & 0o077 == 0
    assert sha256(target / "docs" / "default" / "valve.md") == sha256(uploaded)
    conn = sqlite3.connect(target / "edgekb.db")
    paths = [r[0] for r in conn.execute("SELECT path FROM documents ORDER BY path")]
    turns = conn.execute("SELECT question, answer FROM turns").fetchall()
    conn.close()
    # The uploaded copy is now the restored one; the demo manuals stay where they are.
    assert str(target / "docs" / "default" / "valve.md") in paths
    assert not any(str(data_dir) in p for p in paths)
    assert turns == [("q?", "a.")]
    doctor = run_edgekb(["doctor", "--json", "--data-dir", str(target)], env)
    index = [json.loads(line) for line in doctor.stdout.splitlines()
             if json.loads(line)["check"] == "index"]
    assert [f["level"] for f in index] == ["ok"]
    found = run_edgekb(["search", "handwheel V-9", "--data-dir", str(target), "--json"], env,
                       check=True)
    assert json.loads(found.stdout.splitlines()[0])["doc"] == "valve.md"


def test_restore_refuses_a_data_dir_that_is_not_empty(data_dir: Path, tmp_path: Path,
                                                      models_cache: Path) -> None:
    env = edgekb_env(models_cache)
    archive = tmp_path / "edgekb.tar"
    run_edgekb(["backup", str(archive), "--data-dir", str(data_dir)], env, check=True)
    before = sha256(data_dir / "edgekb.db")
    result = run_edgekb(["restore", str(archive), "--data-dir", str(data_dir)], env)
    assert result.returncode == 2 and "restore_failed" in result.stderr
    assert "not empty" in result.stderr and sha256(data_dir / "edgekb.db") == before


def rewrite_archive(source: Path, target: Path, change: Any) -> None:
    """Copy an archive, letting ``change(name, data) -> data`` alter members on the way."""
    with tarfile.open(source) as old, tarfile.open(target, "w") as new:
        for member in old:
            data = old.extractfile(member).read()  # type: ignore[union-attr]
            data = change(member.name, data)
            member.size = len(data)
            new.addfile(member, io.BytesIO(data))


def test_a_damaged_or_foreign_archive_restores_nothing(data_dir: Path, tmp_path: Path,
                                                       models_cache: Path) -> None:
    env = edgekb_env(models_cache)
    archive = tmp_path / "edgekb.tar"
    run_edgekb(["backup", str(archive), "--data-dir", str(data_dir)], env, check=True)

    def flip_a_byte(name: str, data: bytes) -> bytes:
        if not name.endswith("edgekb.db"):
            return data
        middle = len(data) // 2
        return data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:]

    def escape(name: str, data: bytes) -> bytes:
        if name != MANIFEST:
            return data
        manifest = json.loads(data)
        manifest["files"].append({"path": "../../etc/cron.d/x", "size": 1, "sha256": "0" * 64})
        return json.dumps(manifest).encode()

    def newer(name: str, data: bytes) -> bytes:
        if name != MANIFEST:
            return data
        return json.dumps({**json.loads(data), "schema_version": len(MIGRATIONS) + 1}).encode()

    cases = {"damaged": (flip_a_byte, "does not match its sha256"),
             "escape": (escape, "refusing the path"),
             "newer": (newer, "schema_too_new")}
    for name, (change, message) in cases.items():
        bad = tmp_path / f"{name}.tar"
        rewrite_archive(archive, bad, change)
        target = tmp_path / f"target-{name}"
        result = run_edgekb(["restore", str(bad), "--data-dir", str(target)], env)
        assert result.returncode == 2 and message in result.stderr, (name, result.stderr)
        assert listing(target) in ([], ["edgekb.lock"]), name  # nothing restored
    (tmp_path / "junk.tar").write_bytes(b"not an archive at all")
    result = run_edgekb(["restore", str(tmp_path / "junk.tar"), "--data-dir",
                         str(tmp_path / "t")], env)
    assert result.returncode == 2 and "not an edgekb backup" in result.stderr


def test_no_room_for_the_backup_is_a_typed_error_and_writes_nothing(
        data_dir: Path, tmp_path: Path, models_cache: Path) -> None:
    env = edgekb_env(models_cache, EDGEKB_STORAGE__MIN_FREE_MB="1000000")
    archive = tmp_path / "out" / "edgekb.tar"
    result = run_edgekb(["backup", str(archive), "--data-dir", str(data_dir)], env)
    assert result.returncode == 2 and "disk_full" in result.stderr
    assert listing(archive.parent) == []


def make_schema_2_database(data_dir: Path) -> None:
    """A data dir as an edgekb with two migrations left it: one document, one chunk."""
    data_dir.mkdir(parents=True)
    conn = sqlite3.connect(data_dir / "edgekb.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    for number, script in enumerate(MIGRATIONS[:2], start=1):
        conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")
    conn.execute("INSERT INTO documents VALUES (1, 'default', '/m/old.md', 'Old pump', 'md',"
                 " 'x', 10, 1, 1.0)")
    vector = (np.ones(384) / np.sqrt(384)).astype(np.float32)
    conn.execute("INSERT INTO chunks VALUES (1, 1, 0, 'Intro', NULL, 'Old pump text', 3, ?)",
                 (vector.tobytes(),))
    conn.close()


def test_a_schema_migration_keeps_a_backup_of_the_data_before_it(tmp_path: Path,
                                                                 models_cache: Path) -> None:
    data_dir = tmp_path / "data"
    make_schema_2_database(data_dir)
    env = edgekb_env(models_cache)
    run_edgekb(["ingest", "--demo", "--data-dir", str(data_dir)], env, check=True)
    kept = list((data_dir / "backups").glob("pre-upgrade-schema2-*.tar"))
    assert len(kept) == 1
    conn = sqlite3.connect(data_dir / "edgekb.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    conn.close()
    restored = tmp_path / "restored"
    run_edgekb(["restore", str(kept[0]), "--data-dir", str(restored)], env, check=True)
    conn = sqlite3.connect(restored / "edgekb.db")
    assert [r[0] for r in conn.execute("SELECT title FROM documents")] == ["Old pump"]
    conn.close()
    # An unchanged schema makes no new backup.
    run_edgekb(["ingest", "--demo", "--data-dir", str(data_dir)], env, check=True)
    assert len(list((data_dir / "backups").glob("*.tar"))) == 1


def test_a_database_from_a_newer_edgekb_is_refused_at_start(data_dir: Path,
                                                            models_cache: Path) -> None:
    conn = sqlite3.connect(data_dir / "edgekb.db")
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    result = run_edgekb(["serve", "--data-dir", str(data_dir), "--port", "0"],
                        edgekb_env(models_cache))
    assert result.returncode == 2 and "schema_too_new" in result.stderr
    assert "edgekb ready" not in result.stderr


async def ask_all(server: Server, questions: list[str]) -> list[list[dict[str, Any]]]:
    """Each question in a new session of its own, one after the other."""
    answers = []
    async with aiohttp.ClientSession(headers=server.headers) as http:
        for n, question in enumerate(questions):
            async with http.ws_connect(server.ws_url, protocols=("edgekb.v2",)) as ws:
                await receive_json(ws)
                await ws.send_json({"type": "ask", "id": f"q{n}", "text": question})
                answers.append(await collect(ws, f"q{n}"))
    return answers


def summary(events: list[dict[str, Any]]) -> tuple[list[tuple[str, str]], str, str]:
    """What a user sees: the sources (document, where), the text, how it ended."""
    sources = [(s["doc"], s.get("where") or "") for s in sources_of(events)]
    return sources, answer_text(events), events[-1].get("finish", events[-1]["type"])


async def test_a_backup_under_load_restores_to_a_data_dir_that_answers_the_same(
        data_dir: Path, tmp_path: Path, models_cache: Path) -> None:
    # Short answers suffice; one LLM thread (two spin-wait for each other when other work
    # shares the cores); one client queues several questions at once.
    env = edgekb_env(models_cache, EDGEKB_GENERATION__MAX_TOKENS="48",
                     EDGEKB_GENERATION__THREADS="1", EDGEKB_QUEUE__MAX_PER_USER="8")
    server = start_server(data_dir, env)
    restored_server: Server | None = None
    try:
        archive = tmp_path / "under-load.tar.gz"
        async with aiohttp.ClientSession(headers=server.headers) as http, http.ws_connect(
                server.ws_url, protocols=("edgekb.v2",)) as ws:
            session = (await receive_json(ws))["session"]
            await ws.send_json({"type": "ask", "id": "before", "text": QUESTIONS[0]})
            assert (await collect(ws, "before"))[-1]["type"] == "done"
            # Enough work queued that the server is still answering when the backup is done.
            during = [*QUESTIONS[1:], QUESTIONS[0]]
            for n, question in enumerate(during):
                await ws.send_json({"type": "ask", "id": f"during{n}", "text": question})
            started = time.monotonic()
            backup = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "edgekb", "backup", str(archive),
                                 "--data-dir", str(data_dir)],
                env=env, capture_output=True, text=True, timeout=300)
            took = time.monotonic() - started
            assert backup.returncode == 0, backup.stderr
            status = await (await http.get(server.url + "api/status")).json()
            # The server was answering (or had answers queued) while the backup ran.
            assert status["llm"] != "idle" or status["queued"], (status, took)
            for n in range(len(during)):
                assert (await collect(ws, f"during{n}"))[-1]["type"] == "done"

        restored = tmp_path / "restored"
        run_edgekb(["restore", str(archive), "--data-dir", str(restored)], env, check=True)
        restored_server = start_server(restored, env)
        original = [summary(a) for a in await ask_all(server, QUESTIONS)]
        again = [summary(a) for a in await ask_all(restored_server, QUESTIONS)]
        assert again == original
        assert all(sources and text and finish in ("stop", "length")
                   for sources, text, finish in again)
        # The conversation in progress at backup time is there with its finished turn.
        async with aiohttp.ClientSession(headers=restored_server.headers) as http, \
                http.ws_connect(f"{restored_server.ws_url}?session={session}",
                                protocols=("edgekb.v2",)) as ws:
            welcome = await receive_json(ws)
            assert welcome["resumed"] is True
            await ws.send_json({"type": "history"})
            history = await receive_json(ws)
            assert history["turns"][0]["question"] == QUESTIONS[0]
    finally:
        server.stop()
        if restored_server is not None:
            restored_server.stop()
