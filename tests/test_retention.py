"""Retention on a real SQLite store: what goes by age and by size, what always stays, and the
sweeper waiting for idle time. Rows are aged by moving their timestamps back, as time would."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from edgekb import retention, sessions
from edgekb.config import RetentionSettings
from edgekb.retention import DAY_S, Sweeper
from edgekb.sessions import Ending
from edgekb.store import AsyncStore, Store

NO_LIMITS = RetentionSettings(sessions_days=0, turns_days=0, request_logs_days=0, max_mb=0)


def add_turn(store: Store, session: str, request: str, answer_chars: int = 200,
             deltas: int = 5, ended: bool = True) -> None:
    assert sessions.begin_request(store, session, "tester", request, f"question {request}")
    piece = "x" * (answer_chars // deltas)
    frames = [(n, json.dumps({"type": "delta", "id": request, "seq": n, "text": piece}))
              for n in range(1, deltas + 1)]
    ending = Ending("done", f"question {request}", piece * deltas, [], "stop") if ended else None
    sessions.append_events(store, session, request, frames, ending)


def age(store: Store, days: float, session: str | None = None) -> None:
    """Move rows (of one session, or all) ``days`` into the past."""
    shift = days * DAY_S
    where, args = ("WHERE session_id = ?", (session,)) if session else ("", ())
    with store.transaction():
        store.conn.execute(f"UPDATE requests SET created_at = created_at - ? {where}",
                           (shift, *args))
        store.conn.execute(f"UPDATE turns SET created_at = created_at - ? {where}",
                           (shift, *args))
        store.conn.execute("UPDATE sessions SET updated_at = updated_at - ?"
                           + (" WHERE id = ?" if session else ""), (shift, *args))


def exists(store: Store, session: str) -> bool:
    return sessions.session_owner(store, session) is not None


def count(store: Store, table: str, session: str | None = None) -> int:
    sql = f"SELECT count(*) FROM {table}" + (" WHERE session_id = ?" if session else "")
    return store.conn.execute(sql, (session,) if session else ()).fetchone()[0]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "edgekb.db"


async def sweep(db: Path, settings: RetentionSettings) -> retention.SweepReport:
    store = AsyncStore(db)
    try:
        return await Sweeper(store, settings, lambda: True).sweep()
    finally:
        store.close()


async def test_old_turns_go_even_from_a_session_still_in_use(db: Path) -> None:
    store = Store(db)
    add_turn(store, "kiosk", "old")
    age(store, 40, "kiosk")
    add_turn(store, "kiosk", "new")  # the session is in use today
    store.close()
    report = await sweep(db, RetentionSettings(sessions_days=0, turns_days=30,
                                               request_logs_days=0, max_mb=0))
    store = Store(db)
    assert report.turns == 1
    assert [t.request_id for t in sessions.turns(store, "kiosk", None, 10)] == ["new"]
    assert sessions.request_state(store, "kiosk", "old") is None  # its log went with it
    assert sessions.request_state(store, "kiosk", "new") is not None
    store.close()


async def test_request_logs_go_first_and_their_turns_stay(db: Path) -> None:
    store = Store(db)
    add_turn(store, "s1", "r1")
    age(store, 3)
    add_turn(store, "s2", "r2")
    store.close()
    report = await sweep(db, RetentionSettings(sessions_days=0, turns_days=0,
                                               request_logs_days=2, max_mb=0))
    store = Store(db)
    assert report.request_logs == 1 and report.turns == 0
    assert sessions.request_state(store, "s1", "r1") is None  # resume: unknown request
    assert count(store, "events", "s1") == 0
    assert [t.answer for t in sessions.turns(store, "s1", None, 10)] == ["x" * 200]
    assert count(store, "events", "s2") == 5
    store.close()


async def test_unused_sessions_go_with_everything_they_hold(db: Path) -> None:
    store = Store(db)
    add_turn(store, "gone", "r1")
    add_turn(store, "kept", "r1")
    age(store, 100, "gone")
    store.close()
    report = await sweep(db, RetentionSettings(sessions_days=90, turns_days=0,
                                               request_logs_days=0, max_mb=0))
    store = Store(db)
    assert report.sessions == 1
    assert not exists(store, "gone") and exists(store, "kept")
    assert count(store, "turns", "gone") == count(store, "events", "gone") == 0
    assert count(store, "requests", "gone") == 0
    store.close()


async def test_a_running_request_and_its_session_are_never_touched(db: Path) -> None:
    store = Store(db)
    add_turn(store, "busy", "done-one")
    add_turn(store, "busy", "running", ended=False)
    age(store, 200)
    add_turn(store, "other", "r1")  # newest activity today: the ages are real
    store.close()
    report = await sweep(db, RetentionSettings(sessions_days=90, turns_days=30,
                                               request_logs_days=2, max_mb=0))
    store = Store(db)
    assert exists(store, "busy")
    assert sessions.request_state(store, "busy", "running")[:2] == ("running", 5)
    assert count(store, "events", "busy") == 5  # only the running request's
    assert report.turns == 1
    store.close()


async def test_ages_count_from_the_newest_activity_not_the_wall_clock(db: Path) -> None:
    """Switched off for two months (or a clock that jumped ahead): the history stays."""
    store = Store(db)
    add_turn(store, "s", "older")
    age(store, 20)
    add_turn(store, "s", "newer")
    age(store, 60)  # everything is 60 or 80 days old; nothing happened since
    store.close()
    report = await sweep(db, RetentionSettings(sessions_days=30, turns_days=30,
                                               request_logs_days=0, max_mb=0))
    store = Store(db)
    assert report.sessions == 0 and report.turns == 0
    assert len(sessions.turns(store, "s", None, 10)) == 2
    store.close()
    # Measured from the newest activity, a turn 20 days older than it is within 30 days;
    # with a limit of 10 days it goes.
    report = await sweep(db, RetentionSettings(sessions_days=0, turns_days=10,
                                               request_logs_days=0, max_mb=0))
    assert report.turns == 1


async def test_over_the_size_cap_old_request_logs_go_first_then_the_oldest_turns(
        db: Path) -> None:
    store = Store(db)
    for n in range(300):
        add_turn(store, f"s{n % 30}", f"r{n}", answer_chars=4000, deltas=20)
    age(store, 2 / 24)  # two hours ago
    for n in range(300, 310):  # answered just now: a client may still resume these
        add_turn(store, f"s{n % 30}", f"r{n}", answer_chars=4000, deltas=20)
    sizes = retention.conversation_bytes(store)
    before = sum(sizes.values())
    store.close()
    cap_mb = 1
    assert before > 2 * cap_mb * 1024 * 1024 and sizes["request_logs"] > sizes["turns"]
    report = await sweep(db, RetentionSettings(sessions_days=0, turns_days=0,
                                               request_logs_days=0, max_mb=cap_mb))
    store = Store(db)
    after = sum(retention.conversation_bytes(store).values())
    assert report.bytes_before == before and report.bytes_after == after
    assert 0.7 * cap_mb * 1024 * 1024 < after <= cap_mb * 1024 * 1024
    assert report.request_logs == 300 and report.turns > 0
    for n in range(300, 310):  # the newest answers keep their turns and logs
        assert sessions.request_state(store, f"s{n % 30}", f"r{n}") is not None
    assert sessions.turns(store, "s0", None, 1)[0].request_id != "r0"  # oldest turn gone
    assert report.wal_truncated and (db.parent / "edgekb.db-wal").stat().st_size == 0
    store.close()


async def test_over_the_cap_recent_answers_go_oldest_first_with_their_logs(db: Path) -> None:
    store = Store(db)
    for n in range(300):
        add_turn(store, f"s{n % 30}", f"r{n}", answer_chars=4000, deltas=20)
    store.close()
    report = await sweep(db, RetentionSettings(sessions_days=0, turns_days=0,
                                               request_logs_days=0, max_mb=1))
    store = Store(db)
    assert report.bytes_after <= 1024 * 1024 and report.request_logs == 0
    assert report.bytes_after > 0.7 * 1024 * 1024  # only what was over went, not everything
    kept = {t.request_id for n in range(30) for t in sessions.turns(store, f"s{n}", None, 50)}
    assert kept == {f"r{n}" for n in range(300 - len(kept), 300)}  # a suffix: the newest
    assert all(sessions.request_state(store, f"s{int(r[1:]) % 30}", r) for r in kept)
    store.close()


async def test_nothing_to_do_deletes_nothing(db: Path) -> None:
    store = Store(db)
    add_turn(store, "s", "r")
    store.close()
    report = await sweep(db, RetentionSettings())
    assert report.deleted == 0 and report.bytes_before > 0
    assert (await sweep(db, NO_LIMITS)).deleted == 0


async def test_the_sweeper_waits_for_the_llm_to_be_idle(db: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(db)
    add_turn(store, "s", "r")
    age(store, 100)
    add_turn(store, "today", "r")
    store.close()
    monkeypatch.setattr(retention, "IDLE_POLL_S", 0.01)
    idle_answers = iter([False] * 5 + [True] * 1000)
    polls: list[bool] = []

    def is_idle() -> bool:
        polls.append(next(idle_answers))
        return polls[-1]

    async_store = AsyncStore(db)
    settings = RetentionSettings(sessions_days=90, turns_days=0, request_logs_days=0,
                                 max_mb=0, sweep_interval_s=1)
    task = asyncio.create_task(Sweeper(async_store, settings, is_idle).run())
    try:
        for _ in range(300):  # bounded: at most 3 s
            await asyncio.sleep(0.01)
            if not await async_store.read(lambda s: exists(s, "s")):
                break
        assert polls[:6] == [False] * 5 + [True]  # it swept only once idle
        assert not await async_store.read(lambda s: exists(s, "s"))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        async_store.close()


def test_start_up_compacts_a_database_that_is_mostly_free_pages(db: Path) -> None:
    store = Store(db)
    for n in range(400):
        add_turn(store, f"s{n}", "r", answer_chars=40000, deltas=10)
    with store.transaction():
        store.conn.execute("DELETE FROM sessions")
    retention.truncate_wal(store)
    free, total = retention.free_pages_bytes(store)
    assert free > total * 0.9
    # Not when the disk cannot hold the copy VACUUM writes (a floor of 10 PB).
    assert not retention.compact_if_fragmented(store, db.parent, 10 ** 10)
    assert db.stat().st_size == total
    assert retention.compact_if_fragmented(store, db.parent, 0)
    assert db.stat().st_size < total * 0.1
    assert not retention.compact_if_fragmented(store, db.parent, 0)  # nothing left to gain
    store.close()


async def test_a_wal_grown_large_is_truncated_even_with_nothing_to_delete(db: Path) -> None:
    store = Store(db)  # kept open: the last connection to close would remove the WAL itself
    store.conn.execute("PRAGMA wal_autocheckpoint=0")  # as if a reader had held it back
    for n in range(120):
        add_turn(store, f"s{n}", "r", answer_chars=100_000, deltas=10)
    wal = db.parent / "edgekb.db-wal"
    assert wal.stat().st_size > retention.WAL_TRUNCATE_BYTES
    report = await sweep(db, NO_LIMITS)
    assert report.deleted == 0 and report.wal_truncated
    assert wal.stat().st_size == 0
    store.close()
