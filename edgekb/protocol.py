"""The edgekb.v1 conversation protocol: client messages, their validation, server events.

Transport-free: it turns text into typed messages and events into dicts, and knows nothing of
sockets, so WebSocket, SSE and tests share one definition of the wire.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Union

from .errors import EdgekbError, ProtocolError

PROTOCOL = "edgekb.v1"
MAX_QUESTION_CHARS = 4000

# Error codes a client can see.
BAD_JSON = "bad_json"
UNKNOWN_TYPE = "unknown_type"
INVALID_FIELD = "invalid_field"
TOO_LARGE = "too_large"
UNKNOWN_REQUEST = "unknown_request"
ID_REUSE = "id_reuse"

_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


@dataclass(frozen=True)
class Ask:
    id: str
    text: str


@dataclass(frozen=True)
class Cancel:
    id: str


@dataclass(frozen=True)
class Ping:
    pass


ClientMessage = Union[Ask, Cancel, Ping]


def parse_client_message(raw: str | bytes, max_bytes: int) -> ClientMessage:
    """Validate one client frame; every failure is a ProtocolError with a named code."""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > max_bytes:
        raise ProtocolError(TOO_LARGE, f"message of {size} bytes exceeds {max_bytes}")
    try:
        message = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(BAD_JSON, f"not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(BAD_JSON, "a message must be a JSON object")
    kind = message.get("type")
    if kind == "ask":
        text = message.get("text")
        if not isinstance(text, str) or not text.strip():
            raise _invalid(message, "text", "a non-empty string")
        if len(text) > MAX_QUESTION_CHARS:
            raise _invalid(message, "text", f"at most {MAX_QUESTION_CHARS} characters")
        return Ask(_request_id(message), text.strip())
    if kind == "cancel":
        return Cancel(_request_id(message))
    if kind == "ping":
        return Ping()
    raise ProtocolError(UNKNOWN_TYPE, f"unknown message type {kind!r}",
                        **_echo_id(message))


def _request_id(message: dict[str, Any]) -> str:
    value = message.get("id")
    if not isinstance(value, str) or not _ID.match(value):
        raise ProtocolError(INVALID_FIELD, "id: expected 1-64 characters of A-Z a-z 0-9 _ . : -",
                            field="id")
    return value


def _invalid(message: dict[str, Any], field: str, expected: str) -> ProtocolError:
    return ProtocolError(INVALID_FIELD, f"{field}: expected {expected}", field=field,
                         **_echo_id(message))


def _echo_id(message: dict[str, Any]) -> dict[str, str]:
    """Echo a well-formed id so the client can match the error to its request."""
    value = message.get("id")
    return {"id": value} if isinstance(value, str) and _ID.match(value) else {}


def event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, **fields}


def error_event(error: EdgekbError, **fields: Any) -> dict[str, Any]:
    return {"type": "error", **fields, **error.to_wire()}


def encode(message: dict[str, Any]) -> str:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))
