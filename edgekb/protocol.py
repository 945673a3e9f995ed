"""The edgekb.v2 conversation protocol: client messages and their validation (server events are
built in events.py).

Transport-free: it turns text into typed messages and knows nothing of sockets, so WebSocket,
SSE and tests share one definition of the wire. Every id is matched whole (``fullmatch``: a
trailing newline is not part of a valid id).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Union

from .errors import ProtocolError

# v2 (2026-12): one `source` event per source, `done` without the text, every request event
# within events.MAX_EVENT_BYTES, `welcome.running`. v1 clients would miss sources and text.
PROTOCOL = "edgekb.v2"
MAX_QUESTION_CHARS = 4000

# Error codes a client can see.
BAD_JSON = "bad_json"
UNKNOWN_TYPE = "unknown_type"
INVALID_FIELD = "invalid_field"
TOO_LARGE = "too_large"
UNKNOWN_REQUEST = "unknown_request"
ID_REUSE = "id_reuse"

_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
_KB = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_SESSION = re.compile(r"[A-Za-z0-9_\-]{8,64}")


@dataclass(frozen=True)
class Ask:
    id: str
    text: str
    kbs: tuple[str, ...] | None = None   # knowledge bases to search; None: all


@dataclass(frozen=True)
class Cancel:
    id: str


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Resume:
    id: str
    after: int


@dataclass(frozen=True)
class Hello:
    session: str | None
    client: str | None
    resume: tuple[Resume, ...]


@dataclass(frozen=True)
class Typing:
    """A partial question (optional for clients): the server may answer with a `hint`."""
    text: str
    kbs: tuple[str, ...] | None = None


@dataclass(frozen=True)
class History:
    before: int | None
    limit: int


ClientMessage = Union[Ask, Cancel, Ping, Resume, Hello, History, Typing]
MAX_RESUMES = 32
MAX_HISTORY = 50

# Close codes a browser can see (RFC 6455 leaves 4000-4999 to applications).
CLOSE_UNAUTHORIZED = 4001
CLOSE_TAKEN_OVER = 4004
CLOSE_IDLE = 4008
CLOSE_TOO_SLOW = 4010
CLOSE_RATE_LIMITED = 4029


def parse_client_message(raw: str | bytes, max_bytes: int) -> ClientMessage:
    """Validate one client frame; every failure is a ProtocolError with a named code."""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > max_bytes:
        raise ProtocolError(TOO_LARGE, f"message of {size} bytes exceeds {max_bytes}")
    try:
        message = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(BAD_JSON, f"not valid JSON: {exc}") from None
    except RecursionError:  # nested thousands deep: json gives up before we would
        raise ProtocolError(BAD_JSON, "JSON nested too deeply") from None
    if not isinstance(message, dict):
        raise ProtocolError(BAD_JSON, "a message must be a JSON object")
    kind = message.get("type")
    if kind == "ask":
        text = message.get("text")
        if not isinstance(text, str) or not text.strip():
            raise _invalid(message, "text", "a non-empty string")
        if len(text) > MAX_QUESTION_CHARS:
            raise _invalid(message, "text", f"at most {MAX_QUESTION_CHARS} characters")
        return Ask(_request_id(message), text.strip(), _kbs(message))
    if kind == "typing":
        text = message.get("text")
        if not isinstance(text, str) or len(text) > MAX_QUESTION_CHARS:
            raise _invalid(message, "text", f"a string of at most {MAX_QUESTION_CHARS} "
                           "characters")
        return Typing(text, _kbs(message))
    if kind == "cancel":
        return Cancel(_request_id(message))
    if kind == "ping":
        return Ping()
    if kind == "resume":
        return _resume(message)
    if kind == "hello":
        return _hello(message)
    if kind == "history":
        before = message.get("before")
        if before is not None and not _is_int(before, 1):
            raise _invalid(message, "before", "a turn number")
        limit = message.get("limit", 20)
        if not _is_int(limit, 1, MAX_HISTORY):
            raise _invalid(message, "limit", f"an integer from 1 to {MAX_HISTORY}")
        return History(before, limit)
    raise ProtocolError(UNKNOWN_TYPE, f"unknown message type {kind!r}",
                        **_echo_id(message))


def _kbs(message: dict[str, Any]) -> tuple[str, ...] | None:
    kbs = message.get("kbs")
    if kbs is not None and not (isinstance(kbs, list) and 0 < len(kbs) <= 32 and all(
            isinstance(k, str) and _KB.fullmatch(k) for k in kbs)):
        raise _invalid(message, "kbs", "a list of knowledge base names")
    return tuple(kbs) if kbs else None


def _is_int(value: Any, low: int, high: int = 1 << 53) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _resume(message: dict[str, Any]) -> Resume:
    after = message.get("after", 0)
    if not _is_int(after, 0):
        raise _invalid(message, "after", "the last seq received (an integer >= 0)")
    return Resume(_request_id(message), after)


def _hello(message: dict[str, Any]) -> Hello:
    session = message.get("session")
    if session is not None and not (isinstance(session, str) and _SESSION.fullmatch(session)):
        raise _invalid(message, "session", "8-64 characters of A-Z a-z 0-9 _ -")
    client = message.get("client")
    if client is not None and not (isinstance(client, str) and _ID.fullmatch(client)):
        raise _invalid(message, "client", "1-64 characters of A-Z a-z 0-9 _ . : -")
    resumes = message.get("resume", [])
    if not isinstance(resumes, list) or len(resumes) > MAX_RESUMES:
        raise _invalid(message, "resume", f"a list of at most {MAX_RESUMES} {{id, after}}")
    items = tuple(_resume(r) if isinstance(r, dict) else _invalid_raise("resume")
                  for r in resumes)
    return Hello(session, client, items)


def _invalid_raise(field: str) -> Resume:
    raise ProtocolError(INVALID_FIELD, f"{field}: expected objects {{id, after}}", field=field)


def _request_id(message: dict[str, Any]) -> str:
    value = message.get("id")
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ProtocolError(INVALID_FIELD, "id: expected 1-64 characters of A-Z a-z 0-9 _ . : -",
                            field="id")
    return value


def _invalid(message: dict[str, Any], field: str, expected: str) -> ProtocolError:
    return ProtocolError(INVALID_FIELD, f"{field}: expected {expected}", field=field,
                         **_echo_id(message))


def _echo_id(message: dict[str, Any]) -> dict[str, str]:
    """Echo a well-formed id so the client can match the error to its request."""
    value = message.get("id")
    return {"id": value} if isinstance(value, str) and _ID.fullmatch(value) else {}


def valid_session_id(value: str) -> bool:
    return bool(_SESSION.fullmatch(value))


def valid_client_id(value: str) -> bool:
    return bool(_ID.fullmatch(value))
