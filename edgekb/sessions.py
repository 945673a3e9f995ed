"""Conversations in SQLite: sessions, requests with their event logs, and finished turns.

Blocking functions over a ``Store``; the server calls them on the store's threads. A request's
events are stored as sent, so a resume replays exactly the frames a live client saw.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .protocol import encode
from .store import Store


@dataclass(frozen=True)
class Turn:
    id: int
    request_id: str
    question: str
    answer: str
    sources: list[dict[str, Any]]
    finish: str
    created_at: float

    def to_wire(self) -> dict[str, Any]:
        return {"turn": self.id, "id": self.request_id, "question": self.question,
                "answer": self.answer, "sources": self.sources, "finish": self.finish,
                "at": round(self.created_at, 3)}


def new_session_id() -> str:
    return secrets.token_urlsafe(16)


def open_session(store: Store, session_id: str, user: str | None) -> bool:
    """Create the session or touch it; True when it already existed."""
    now = time.time()
    with store.transaction():
        existed = store.conn.execute("SELECT 1 FROM sessions WHERE id=?",
                                     (session_id,)).fetchone() is not None
        store.conn.execute(
            "INSERT INTO sessions (id, user, created_at, updated_at) VALUES (?,?,?,?)"
            " ON CONFLICT(id) DO UPDATE SET updated_at=excluded.updated_at",
            (session_id, user, now, now))
    return existed


def session_exists(store: Store, session_id: str) -> bool:
    return store.conn.execute("SELECT 1 FROM sessions WHERE id=?",
                              (session_id,)).fetchone() is not None


def begin_request(store: Store, session_id: str, request_id: str, question: str) -> bool:
    """Record a new request; False when the id was already used in this session."""
    cur = store.conn.execute(
        "INSERT OR IGNORE INTO requests (session_id, id, question, state, created_at)"
        " VALUES (?,?,?,?,?)", (session_id, request_id, question, "running", time.time()))
    return cur.rowcount == 1


@dataclass(frozen=True)
class Ending:
    """How a request ended, stored with its last event: state of the request and its turn."""
    state: str          # done, cancelled, failed, interrupted
    question: str
    answer: str
    sources: list[dict[str, Any]]
    finish: str


def append_events(store: Store, session_id: str, request_id: str,
                  frames: list[tuple[int, str]], ending: Ending | None = None) -> None:
    """Append encoded events (seq, frame) to a request's log; with ``ending``, also end the
    request and keep it as a turn of the session, in the same transaction (a reader never
    sees `done` without the turn)."""
    with store.transaction():
        store.conn.executemany(
            "INSERT OR IGNORE INTO events (session_id, request_id, seq, body) VALUES (?,?,?,?)",
            [(session_id, request_id, seq, frame) for seq, frame in frames])
        store.conn.execute("UPDATE requests SET last_seq=max(last_seq, ?) WHERE session_id=?"
                           " AND id=?", (frames[-1][0], session_id, request_id))
        if ending is not None:
            _end_request(store, session_id, request_id, ending)


def _end_request(store: Store, session_id: str, request_id: str, ending: Ending) -> None:
    now = time.time()
    store.conn.execute("UPDATE requests SET state=? WHERE session_id=? AND id=?",
                       (ending.state, session_id, request_id))
    store.conn.execute(
        "INSERT INTO turns (session_id, request_id, question, answer, sources, finish,"
        " created_at) VALUES (?,?,?,?,?,?,?)",
        (session_id, request_id, ending.question, ending.answer,
         json.dumps(ending.sources, ensure_ascii=False), ending.finish, now))
    store.conn.execute("UPDATE sessions SET updated_at=? WHERE id=?", (now, session_id))


def request_state(store: Store, session_id: str, request_id: str) -> tuple[str, int] | None:
    row = store.conn.execute("SELECT state, last_seq FROM requests WHERE session_id=? AND id=?",
                             (session_id, request_id)).fetchone()
    return (row[0], row[1]) if row else None


def frames_after(store: Store, session_id: str, request_id: str, after: int,
                 limit: int) -> list[tuple[int, str]]:
    """(seq, encoded event) of the request's log after ``after``, as they were sent."""
    return store.conn.execute(
        "SELECT seq, body FROM events WHERE session_id=? AND request_id=? AND seq>? ORDER BY seq"
        " LIMIT ?", (session_id, request_id, after, limit)).fetchall()


def turns(store: Store, session_id: str, before: int | None, limit: int) -> list[Turn]:
    """The newest ``limit`` turns older than turn ``before``, oldest first."""
    rows = store.conn.execute(
        "SELECT id, request_id, question, answer, sources, finish, created_at FROM turns"
        " WHERE session_id=? AND id<? ORDER BY id DESC LIMIT ?",
        (session_id, before if before is not None else 1 << 62, limit)).fetchall()
    return [Turn(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6]) for r in reversed(rows)]


def interrupt_running(store: Store) -> int:
    """After a restart: end every request that was cut off with a typed error that carries
    the text generated so far, and keep it as a turn. Returns how many."""
    running = store.conn.execute(
        "SELECT session_id, id, question, last_seq FROM requests WHERE state='running'"
    ).fetchall()
    for session_id, request_id, question, last_seq in running:
        events = [json.loads(frame) for _, frame in
                  frames_after(store, session_id, request_id, 0, last_seq + 1)]
        text = "".join(e.get("text", "") for e in events if e["type"] == "delta")
        sources = next((e["sources"] for e in events if e["type"] == "sources"), [])
        error = {"type": "error", "id": request_id, "seq": last_seq + 1, "code": "interrupted",
                 "message": "the server restarted while this answer was being written",
                 "text": text}
        append_events(store, session_id, request_id, [(error["seq"], encode(error))],
                      Ending("interrupted", question, text, sources, "interrupted"))
    return len(running)
