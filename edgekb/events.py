"""Every event the server sends, built in one place and each within a small size bound.

A request's events (queued, status, source, delta, done, error) get their ``id`` and ``seq``
from the request's log (runs.py); the rest (welcome, pong, history, notice, and errors that
answer a bad frame) belong to the connection. ``SPEC`` lists each event's fields; the builders
below produce exactly those, and ``problems`` checks any frame against them (the tests run every
frame the server sends through it).

Why the bound: on a link that drops after every kilobyte, a client must still make progress. So
no request event may exceed MAX_EVENT_BYTES encoded: one source per event, `done` carries the
answer's length and hash instead of its text, a long delta is split, and `welcome` stays small.
Each connection that delivers a kilobyte moves the client's cursor by at least one event.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .errors import EdgekbError

Event = dict[str, Any]

MAX_EVENT_BYTES = 1024
# Room for "id" (at most 64 characters) and "seq" that the request log adds to each event.
_ID_SEQ_BYTES = len(',"id":"","seq":') + 64 + 12
_FIELD_BUDGET = MAX_EVENT_BYTES - _ID_SEQ_BYTES

_NUMBER = (int, float)
_OPTIONAL_NUMBER = (int, float, type(None))
_OPTIONAL_STR = (str, type(None))

# type -> (required fields, optional fields), each field -> the types it may have.
SPEC: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "welcome": ({"protocol": str, "server": str, "session": str, "resumed": bool,
                 "limits": dict, "heartbeat": dict, "running": list}, {}),
    "pong": ({}, {}),
    "history": ({"session": str, "turns": list, "more": bool}, {}),
    "notice": ({"event": str, "message": str}, {"kb": str}),
    "request": ({"session": str, "id": str, "after": int}, {}),
    "queued": ({"id": str, "seq": int, "position": int}, {"wait_s": _OPTIONAL_NUMBER}),
    "status": ({"id": str, "seq": int, "stage": str}, {"progress": _NUMBER}),
    "source": ({"id": str, "seq": int, "n": int, "doc": str, "title": str, "where": str,
                "page": (int, type(None)), "snippet": str},
               {"relevance": str, "score": _NUMBER, "kb": str}),
    "delta": ({"id": str, "seq": int, "text": str}, {}),
    "done": ({"id": str, "seq": int, "finish": str, "chars": int, "sha256": str,
              "usage": dict, "timings": dict}, {}),
    "hint": ({"kind": str, "sources": list}, {"id": str, "seq": int, "text": str}),
    "error": ({"code": str, "message": str},
              {"id": str, "seq": int, "retry_after": _NUMBER, "field": str, "text": str,
               "chars": int}),
}
REQUEST_EVENTS = frozenset({"queued", "status", "source", "delta", "done", "error"})
# Bounded like request events: a `see_also` hint is one, a `typing` one answers a connection.
BOUNDED_EVENTS = REQUEST_EVENTS | {"welcome", "hint"}
HINT_KINDS = ("typing", "see_also")
MAX_HINTS = 3
_HINT_FIELDS = {"doc": 80, "title": 120, "where": 120, "page": 0, "relevance": 0, "kb": 0}
STAGES = ("retrieving", "reading", "generating")


def encode(event: Mapping[str, Any]) -> str:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


def encoded_size(event: Mapping[str, Any]) -> int:
    return len(encode(event).encode())


# --- connection events ------------------------------------------------------------------------

def welcome(*, session: str, resumed: bool, protocol: str, server: str,
            limits: Mapping[str, Any], heartbeat: Mapping[str, Any],
            running: Sequence[Mapping[str, Any]]) -> Event:
    """The first frame of a connection; ``running`` names the session's unfinished requests
    ({id, seq}) so a reloaded page or a second device can follow them."""
    return {"type": "welcome", "protocol": protocol, "server": server, "session": session,
            "resumed": resumed, "limits": dict(limits), "heartbeat": dict(heartbeat),
            "running": [dict(r) for r in running]}


def pong() -> Event:
    return {"type": "pong"}


def history(session: str, turns: Sequence[Mapping[str, Any]], more: bool) -> Event:
    return {"type": "history", "session": session, "turns": list(turns), "more": more}


def notice(event: str, message: str, *, kb: str | None = None) -> Event:
    body: Event = {"type": "notice", "event": event, "message": message}
    if kb is not None:
        body["kb"] = kb
    return body


def request(session: str, request_id: str, after: int) -> Event:
    """The first event of an HTTP event stream (SSE): whose events follow, from which seq on.
    It has no seq of its own (it is not in the request's log)."""
    return {"type": "request", "session": session, "id": request_id, "after": after}


def error(exc: EdgekbError) -> Event:
    """An error: of a request when the log numbers it, or the answer to a bad frame."""
    return {"type": "error", **exc.to_wire()}


# --- request events ---------------------------------------------------------------------------

def queued(position: int, wait_s: float | None = None) -> Event:
    body: Event = {"type": "queued", "position": position}
    if wait_s is not None:
        body["wait_s"] = round(wait_s, 1)
    return body


def status(stage: str, progress: float | None = None) -> Event:
    body: Event = {"type": "status", "stage": stage}
    if progress is not None:
        body["progress"] = round(progress, 3)
    return body


def source(entry: Mapping[str, Any]) -> Event:
    """One retrieved passage; its snippet is cut (at a character boundary) to fit the bound."""
    body: Event = {"type": "source", **entry}
    for field in ("title", "where"):
        body[field] = _cut(str(body.get(field) or ""), 160)
    overflow = encoded_size(body) - _FIELD_BUDGET
    if overflow > 0:
        body["snippet"] = _cut_bytes(str(body.get("snippet", "")), overflow + 3)
    return body


def deltas(text: str) -> Iterator[Event]:
    """``text`` as delta events, split where one would exceed the bound."""
    limit = _FIELD_BUDGET - len('{"type":"delta","text":""}')
    start = 0
    while start < len(text):
        end, size = start, 0
        while end < len(text):
            step = len(json.dumps(text[end], ensure_ascii=False).encode()) - 2
            if size + step > limit:
                break
            size += step
            end += 1
        yield {"type": "delta", "text": text[start:end]}
        start = end


def done(finish: str, text: str, usage: Mapping[str, Any], timings: Mapping[str, Any]) -> Event:
    """The end of an answer. The client has the text from the deltas; ``chars`` and ``sha256``
    (of the UTF-8 text) let it check that it has all of it."""
    return {"type": "done", "finish": finish, "chars": len(text),
            "sha256": text_digest(text), "usage": dict(usage), "timings": dict(timings)}


def hint(kind: str, entries: Sequence[Mapping[str, Any]], text: str | None = None) -> Event:
    """Passages retrieval found ahead of a question (``typing``: for ``text``, the partial
    question it answers) or beside an answer (``see_also``: a related section the answer did
    not use). At most MAX_HINTS, without snippets, fields cut by bytes; passages are dropped
    from the end while the event would exceed the bound."""
    sources = []
    for entry in entries[:MAX_HINTS]:
        kept: Event = {}
        for name, limit in _HINT_FIELDS.items():
            if name in entry:
                value = entry[name]
                kept[name] = _cut_to_bytes(value, limit) if limit and isinstance(value, str) \
                    else value
        sources.append(kept)
    body: Event = {"type": "hint", "kind": kind, "sources": sources}
    if text is not None:
        body["text"] = _cut_to_bytes(text, 160)
    while sources and encoded_size(body) > _FIELD_BUDGET:
        sources.pop()
    return body


def _cut_to_bytes(text: str, limit: int) -> str:
    """``text`` within ``limit`` UTF-8 bytes (an ellipsis marks a cut)."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - len("…".encode())].decode("utf-8", errors="ignore") + "…"


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _cut(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _cut_bytes(text: str, drop: int) -> str:
    """``text`` shortened by at least ``drop`` encoded bytes, ending with an ellipsis."""
    data = json.dumps(text, ensure_ascii=False).encode()
    keep = max(0, len(data) - drop - len("…".encode()))
    cut = data[1:keep].decode("utf-8", errors="ignore")
    # A cut inside an escape sequence (\n, \") leaves a dangling backslash: drop it.
    cut = cut[:-1] if cut.endswith("\\") and not cut.endswith("\\\\") else cut
    return json.loads(f'"{cut}"') + "…" if cut else "…"


# --- checking ---------------------------------------------------------------------------------

def problems(frame: str) -> list[str]:
    """What is wrong with one frame the server sent, against SPEC and the size bound."""
    try:
        event = json.loads(frame)
    except ValueError:
        return ["not JSON"]
    if not isinstance(event, dict):
        return ["not an object"]
    kind = event.get("type")
    if kind not in SPEC:
        return [f"unknown type {kind!r}"]
    required, optional = SPEC[kind]
    found = []
    for name, types in required.items():
        if name not in event:
            found.append(f"{kind}: missing {name}")
        elif not _is(event[name], types):
            found.append(f"{kind}: {name} has type {type(event[name]).__name__}")
    for name, value in event.items():
        if name == "type" or name in required:
            continue
        if name not in optional:
            found.append(f"{kind}: unexpected field {name}")
        elif not _is(value, optional[name]):
            found.append(f"{kind}: {name} has type {type(value).__name__}")
    if kind in BOUNDED_EVENTS and len(frame.encode()) > MAX_EVENT_BYTES:
        found.append(f"{kind}: {len(frame.encode())} bytes, over {MAX_EVENT_BYTES}")
    return found


def _is(value: Any, types: Any) -> bool:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        return False  # True is an int to Python, never to a client
    return isinstance(value, types)
