"""Retention: what the appliance keeps of its conversations, so an SD card never fills up.

Three ages and one size (settings ``retention.*``): sessions nobody opened for
``sessions_days`` go with everything they hold; turns older than ``turns_days`` go (with their
request logs) even from a session still in use, since a kiosk page keeps one session forever;
request logs (the events ``resume`` replays) go after ``request_logs_days``, their turns stay
for ``history`` and prompts. Above ``max_mb`` the oldest request logs go first, then the oldest
turns, then the oldest sessions. A running request and its session are never touched.

Ages count back from the newest activity in the store, not from the wall clock alone: an
appliance that was switched off for two months, or whose clock jumped ahead, keeps its history.

Every delete is a short transaction of at most ``BATCH`` rows on the store's writer thread, so
answers being written wait for at most one batch. The sweeper runs when the LLM is idle (or,
under constant load, after waiting one more interval), then truncates the WAL if it deleted
anything or the WAL grew large. A VACUUM blocks
every writer for its whole length, so it runs only at start-up, before anything is served.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import RetentionSettings
from .store import AsyncStore, Store

log = logging.getLogger(__name__)

DAY_S = 86400.0
BATCH = 200
MAX_BATCHES = 500           # per kind and sweep; what is left goes at the next sweep
MAX_SIZE_ROUNDS = 8         # measure, delete the excess share, measure again...
RECENT_LOGS_S = 3600.0      # over the cap, request logs younger than this go with their turn
CAP_TARGET = 0.9            # over the cap, delete down to 90 % of it, not to just below
IDLE_POLL_S = 1.0
CHECKPOINT_BUSY_MS = 200    # a checkpoint that would wait for readers longer gives up
# SQLite checkpoints the WAL by itself but never shrinks the file: one that a burst (a long
# backup holding a snapshot, say) grew past this is truncated by the next sweep.
WAL_TRUNCATE_BYTES = 8 * 1024 * 1024
VACUUM_MIN_FREE_SHARE = 0.25
VACUUM_MIN_FREE_BYTES = 8 * 1024 * 1024
CONVERSATION_TABLES = ("sessions", "requests", "events", "turns")

_NOT_RUNNING = "NOT EXISTS (SELECT 1 FROM requests r WHERE r.session_id = {0} AND r.state = 'running')"


@dataclass
class SweepReport:
    sessions: int = 0
    turns: int = 0
    request_logs: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    wal_truncated: bool = False

    @property
    def deleted(self) -> int:
        return self.sessions + self.turns + self.request_logs


# --- blocking steps, each run on the store's writer thread -------------------------------------

def conversation_bytes(store: Store) -> dict[str, int]:
    """Bytes in use (dbstat: pages less their unused space) by the conversation tables and
    their indexes, by what retention deletes: request_logs, turns, sessions."""
    kind_of_table = {"requests": "request_logs", "events": "request_logs", "turns": "turns",
                     "sessions": "sessions"}
    owners = dict(store.conn.execute(
        f"SELECT name, tbl_name FROM sqlite_schema WHERE tbl_name IN ({_marks(kind_of_table)})",
        list(kind_of_table)).fetchall())
    sizes = dict.fromkeys(("request_logs", "turns", "sessions"), 0)
    for name, used in store.conn.execute(
            f"SELECT name, sum(pgsize - unused) FROM dbstat WHERE aggregate = TRUE"
            f" AND name IN ({_marks(owners)}) GROUP BY name", list(owners)):
        sizes[kind_of_table[owners[name]]] += int(used)
    return sizes


def reference_time(store: Store, now: float) -> float:
    """The newest activity, or now if that is earlier: what ages are measured from."""
    newest = store.conn.execute("SELECT max(updated_at) FROM sessions").fetchone()[0]
    return min(now, newest) if newest is not None else now


def delete_sessions(store: Store, before: float | None, limit: int) -> int:
    """Sessions last used before ``before`` (None: the oldest), with all they hold."""
    where = "updated_at < ?" if before is not None else "1"
    with store.transaction():
        return store.conn.execute(
            f"DELETE FROM sessions WHERE rowid IN (SELECT rowid FROM sessions s WHERE {where}"
            f" AND {_NOT_RUNNING.format('s.id')} ORDER BY updated_at LIMIT ?)",
            (*([before] if before is not None else []), limit)).rowcount


def delete_turns(store: Store, before: float | None, limit: int) -> int:
    """Turns made before ``before`` (None: the oldest), with their request logs."""
    where = "created_at < ?" if before is not None else "1"
    args = (*([before] if before is not None else []), limit)
    with store.transaction():
        # Turn ids grow with time: the oldest are found without scanning the rest.
        ids = [r[0] for r in store.conn.execute(
            f"SELECT id FROM turns WHERE {where} ORDER BY id LIMIT ?", args)]
        if not ids:
            return 0
        marks = _marks(ids)
        store.conn.execute(
            "DELETE FROM requests WHERE (session_id, id) IN (SELECT session_id, request_id"
            f" FROM turns WHERE id IN ({marks})) AND state != 'running'", ids)
        return store.conn.execute(f"DELETE FROM turns WHERE id IN ({marks})", ids).rowcount


def delete_request_logs(store: Store, before: float | None, limit: int) -> int:
    """Ended requests asked before ``before`` (None: the oldest) and their events; the turns
    stay. A later `resume` of one gets the typed unknown_request error."""
    where = "created_at < ?" if before is not None else "1"
    with store.transaction():
        return store.conn.execute(
            "DELETE FROM requests WHERE rowid IN (SELECT rowid FROM requests WHERE"
            f" state != 'running' AND {where} ORDER BY rowid LIMIT ?)",
            (*([before] if before is not None else []), limit)).rowcount


def row_counts(store: Store) -> dict[str, int]:
    return {table: store.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in CONVERSATION_TABLES}


def truncate_wal(store: Store) -> bool:
    """Checkpoint the WAL and truncate it to zero bytes; False if readers held it (the next
    sweep tries again). Waits at most CHECKPOINT_BUSY_MS: this is the writer thread."""
    busy_ms = store.conn.execute("PRAGMA busy_timeout").fetchone()[0]
    store.conn.execute(f"PRAGMA busy_timeout={CHECKPOINT_BUSY_MS}")
    try:
        busy = store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    finally:
        store.conn.execute(f"PRAGMA busy_timeout={busy_ms}")
    return busy == 0


def free_pages_bytes(store: Store) -> tuple[int, int]:
    """(bytes on SQLite's free list, bytes of the whole file)."""
    page = store.conn.execute("PRAGMA page_size").fetchone()[0]
    free = store.conn.execute("PRAGMA freelist_count").fetchone()[0]
    total = store.conn.execute("PRAGMA page_count").fetchone()[0]
    return free * page, total * page


def compact_if_fragmented(store: Store, data_dir: Path, min_free_mb: int) -> bool:
    """VACUUM when a quarter of the file (and at least 8 MB) is free pages, and the disk has
    room for the copy VACUUM writes. Start-up only: it blocks every writer while it runs."""
    free, total = free_pages_bytes(store)
    if free < VACUUM_MIN_FREE_BYTES or free < total * VACUUM_MIN_FREE_SHARE:
        return False
    needed = 2 * (total - free) + min_free_mb * 1024 * 1024  # the copy, then the WAL of it
    if shutil.disk_usage(data_dir).free < needed:
        log.warning("not compacting the database (%d MB free in it): the disk lacks %d MB"
                    " for the copy", free >> 20, needed >> 20)
        return False
    started = time.monotonic()
    store.conn.execute("VACUUM")
    truncate_wal(store)
    log.warning("compacted the database: %d of %d MB were free pages (%.1f s)",
                free >> 20, total >> 20, time.monotonic() - started)
    return True


def _marks(items: object) -> str:
    return ",".join("?" * len(items))  # type: ignore[arg-type]


# --- the sweeper ---------------------------------------------------------------------------------

_DELETERS: dict[str, Callable[[Store, float | None, int], int]] = {
    "request_logs": delete_request_logs, "turns": delete_turns, "sessions": delete_sessions}


class Sweeper:
    """Applies the retention settings in bounded batches, preferably while the LLM is idle."""

    def __init__(self, store: AsyncStore, settings: RetentionSettings,
                 is_idle: Callable[[], bool], clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self.is_idle = is_idle
        self.clock = clock

    async def run(self) -> None:
        """Sweep every ``sweep_interval_s`` until cancelled; a failed sweep is logged and the
        next one tries again."""
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            await self._wait_for_idle(self.settings.sweep_interval_s)
            try:
                report = await self.sweep()
            except Exception:
                log.exception("retention sweep failed")
                continue
            if report.deleted:
                log.info("retention: deleted %d sessions, %d turns, %d request logs;"
                         " conversations %d -> %d KB", report.sessions, report.turns,
                         report.request_logs, report.bytes_before >> 10,
                         report.bytes_after >> 10)

    async def _wait_for_idle(self, max_wait_s: float) -> None:
        for _ in range(max(1, math.ceil(max_wait_s / IDLE_POLL_S))):
            if self.is_idle():
                return
            await asyncio.sleep(IDLE_POLL_S)

    async def sweep(self) -> SweepReport:
        report = SweepReport()
        reference = await self.store.write(lambda db: reference_time(db, self.clock()))
        ages = {"sessions": self.settings.sessions_days, "turns": self.settings.turns_days,
                "request_logs": self.settings.request_logs_days}
        for kind, days in ages.items():
            if days > 0:
                await self._delete(report, kind, reference - days * DAY_S, MAX_BATCHES * BATCH)
        await self._enforce_cap(report, reference)
        wal = self.store.path.with_name(self.store.path.name + "-wal")
        if report.deleted or (wal.exists() and wal.stat().st_size > WAL_TRUNCATE_BYTES):
            report.wal_truncated = await self.store.write(truncate_wal)
        return report

    async def _enforce_cap(self, report: SweepReport, reference: float) -> None:
        cap = int(self.settings.max_mb * 1024 * 1024)
        sizes = await self.store.read(conversation_bytes)
        report.bytes_before = report.bytes_after = sum(sizes.values())
        if not cap or report.bytes_before <= cap:
            return
        target = cap * CAP_TARGET
        for _ in range(MAX_SIZE_ROUNDS):
            excess = report.bytes_after - target
            if excess <= 0:
                return
            counts = await self.store.read(row_counts)
            # What deleting one row frees, on average: a turn goes with its request log, a
            # session with everything.
            frees = {"request_logs": sizes["request_logs"] / max(1, counts["requests"]),
                     "turns": (sizes["turns"] + sizes["request_logs"]) / max(1, counts["turns"]),
                     "sessions": sum(sizes.values()) / max(1, counts["sessions"])}
            deleted = 0
            # The oldest request logs first, but not those of the last hour (a client that
            # lost its link resumes from them); what they cannot free comes from the oldest
            # turns (with their logs), then sessions. Measuring again corrects the estimate.
            for kind, table, before in (
                    ("request_logs", "requests", reference - RECENT_LOGS_S),
                    ("turns", "turns", None), ("sessions", "sessions", None)):
                if excess <= 0:
                    break
                if not counts[table] or not frees[kind]:
                    continue
                gone = await self._delete(report, kind, before,
                                          math.ceil(excess / frees[kind]))
                excess -= frees[kind] * gone
                deleted += gone
            if not deleted:
                return  # nothing left that may be deleted (running requests only)
            sizes = await self.store.read(conversation_bytes)
            report.bytes_after = sum(sizes.values())

    async def _delete(self, report: SweepReport, kind: str, before: float | None,
                      at_most: int) -> int:
        deleter = _DELETERS[kind]
        total = 0
        for _ in range(math.ceil(at_most / BATCH)):
            limit = min(BATCH, at_most - total)
            deleted = await self.store.write(lambda db, n=limit: deleter(db, before, n))
            total += deleted
            if deleted < limit:
                break
        setattr(report, kind, getattr(report, kind) + total)
        return total
