"""Conversations in SQLite: sessions, requests with their event logs, and ended turns.

Blocking functions over a ``Store``; only the conversation core (conversations.py) calls them,
on the store's threads. A request's events are stored as sent, so a resume replays exactly the
frames a live client saw.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .errors import EdgekbError
from .events import encode
from .store import Store

# Only these endings are answers a later prompt may build on; a cancelled, failed or refused
# request left no answer (an empty one in a prompt teaches the model to answer nothing).
FINISHED = ("stop", "length")


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


@dataclass(frozen=True)
class Ending:
    """How a request ended, stored with its last event: state of the request and its turn."""
    state: str          # done, cancelled, failed, interrupted
    question: str
    answer: str
    sources: list[dict[str, Any]]
    finish: str


@dataclass(frozen=True)
class SessionInfo:
    """One conversation as its list shows it."""

    id: str
    title: str          # the name its user gave it, else its first question (cut)
    named: bool         # whether the title is a name the user gave
    created_at: float
    updated_at: float
    turns: int

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "named": self.named,
                "created_at": round(self.created_at, 3), "updated_at": round(self.updated_at, 3),
                "turns": self.turns}


TITLE_CHARS = 80  # a first question shown as a title is cut to this


class SessionTaken(EdgekbError):
    """A session id of another user; never says more (whether it exists is not theirs)."""

    code = "not_found"


def new_session_id() -> str:
    return secrets.token_urlsafe(16)


def session_owner(store: Store, session_id: str) -> str | None:
    row = store.conn.execute("SELECT user FROM sessions WHERE id=?", (session_id,)).fetchone()
    return row[0] if row else None


_SESSION_INFO = """
    SELECT s.id, s.title, s.created_at, s.updated_at,
           (SELECT question FROM requests r WHERE r.session_id = s.id
            ORDER BY r.created_at LIMIT 1),
           (SELECT count(*) FROM turns t WHERE t.session_id = s.id)
    FROM sessions s"""


def _session_info(row: tuple[Any, ...]) -> SessionInfo:
    session_id, title, created, updated, first, turns = row
    if title:
        return SessionInfo(session_id, title, True, created, updated, turns)
    first = " ".join((first or "").split())
    if len(first) > TITLE_CHARS:
        first = first[: TITLE_CHARS - 1].rstrip() + "…"
    return SessionInfo(session_id, first, False, created, updated, turns)


def user_sessions(store: Store, user: str, limit: int) -> list[SessionInfo]:
    """The user's conversations, the most recently active first."""
    rows = store.conn.execute(f"{_SESSION_INFO} WHERE s.user=? ORDER BY s.updated_at DESC,"
                              " s.rowid DESC LIMIT ?", (user, limit)).fetchall()
    return [_session_info(row) for row in rows]


def user_session(store: Store, user: str, session_id: str) -> SessionInfo | None:
    row = store.conn.execute(f"{_SESSION_INFO} WHERE s.id=? AND s.user=?",
                             (session_id, user)).fetchone()
    return _session_info(row) if row else None


def rename_session(store: Store, user: str, session_id: str, title: str | None) -> bool:
    """Give the user's session a name (None: show its first question again); False when it
    is not theirs."""
    cur = store.conn.execute("UPDATE sessions SET title=? WHERE id=? AND user=?",
                             (title, session_id, user))
    return cur.rowcount == 1


def delete_session(store: Store, user: str, session_id: str) -> bool:
    """Forget the user's session with its requests, event logs and turns (foreign keys
    cascade, in one transaction); False when it is not theirs."""
    with store.transaction():
        cur = store.conn.execute("DELETE FROM sessions WHERE id=? AND user=?",
                                 (session_id, user))
    return cur.rowcount == 1


def begin_request(store: Store, session_id: str, user: str, request_id: str,
                  question: str) -> bool:
    """Record a new request (and its session, at its first question); False when the id was
    already used in this session."""
    now = time.time()
    with store.transaction():
        owner = session_owner(store, session_id)
        if owner is None:
            store.conn.execute("INSERT INTO sessions (id, user, created_at, updated_at)"
                               " VALUES (?,?,?,?)", (session_id, user, now, now))
        elif owner != user:
            raise SessionTaken(f"no session {session_id!r}")
        else:  # a question is activity: the conversation moves to the top of its list
            store.conn.execute("UPDATE sessions SET updated_at=? WHERE id=?", (now, session_id))
        cur = store.conn.execute(
            "INSERT OR IGNORE INTO requests (session_id, id, question, state, created_at)"
            " VALUES (?,?,?,?,?)", (session_id, request_id, question, "running", now))
        return cur.rowcount == 1


def append_events(store: Store, session_id: str, request_id: str,
                  frames: list[tuple[int, str]], ending: Ending | None = None) -> None:
    """Append encoded events (seq, frame) to a request's log; with ``ending``, also end the
    request and keep it as a turn of the session, in the same transaction (a reader never
    sees the last event without the turn)."""
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


def request_state(store: Store, session_id: str,
                  request_id: str) -> tuple[str, int, float] | None:
    """(state, last seq, created at) of a request."""
    row = store.conn.execute("SELECT state, last_seq, created_at FROM requests"
                             " WHERE session_id=? AND id=?", (session_id, request_id)).fetchone()
    return (row[0], row[1], row[2]) if row else None


def frames_after(store: Store, session_id: str, request_id: str, after: int,
                 limit: int) -> list[tuple[int, str]]:
    """(seq, encoded event) of the request's log after ``after``, as they were sent."""
    return store.conn.execute(
        "SELECT seq, body FROM events WHERE session_id=? AND request_id=? AND seq>? ORDER BY seq"
        " LIMIT ?", (session_id, request_id, after, limit)).fetchall()


def turns(store: Store, session_id: str, before: int | None, limit: int,
          finished_only: bool = False) -> list[Turn]:
    """The newest ``limit`` turns older than turn ``before``, oldest first; with
    ``finished_only``, only those that ended with an answer (what a prompt may use)."""
    finished = f" AND finish IN {FINISHED}" if finished_only else ""
    rows = store.conn.execute(
        "SELECT id, request_id, question, answer, sources, finish, created_at FROM turns"
        f" WHERE session_id=? AND id<?{finished} ORDER BY id DESC LIMIT ?",
        (session_id, before if before is not None else 1 << 62, limit)).fetchall()
    return [Turn(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6]) for r in reversed(rows)]


def logged_text(frames: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """The answer text and the sources of a request's encoded events."""
    events = [json.loads(frame) for frame in frames]
    text = "".join(e["text"] for e in events if e["type"] == "delta")
    sources = [{k: v for k, v in e.items() if k not in ("type", "id", "seq")}
               for e in events if e["type"] == "source"]
    return text, sources


def interrupt_running(store: Store) -> int:
    """After a restart: end every request that was cut off with a typed error, and keep what it
    had written as a turn. Returns how many."""
    running = store.conn.execute(
        "SELECT session_id, id, question, last_seq FROM requests WHERE state='running'"
    ).fetchall()
    for session_id, request_id, question, last_seq in running:
        frames = [frame for _, frame in frames_after(store, session_id, request_id, 0,
                                                     last_seq + 1)]
        text, sources = logged_text(frames)
        error = {"type": "error", "code": "interrupted", "chars": len(text),
                 "message": "the server restarted while this answer was being written",
                 "id": request_id, "seq": last_seq + 1}
        append_events(store, session_id, request_id, [(last_seq + 1, encode(error))],
                      Ending("interrupted", question, text, sources, "interrupted"))
    return len(running)
