"""A text/event-stream parser as the HTML standard defines it (lines, fields, comments), for
tests that read the server's streams byte by byte; every request event it yields is checked
against edgekb.events.problems."""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from edgekb import events as wire

MAX_EVENTS = 20_000  # bound on events one read collects


@dataclass
class SseEvent:
    data: str
    event: str = "message"
    id: str | None = None     # the id field of this event, if it had one

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.data)


@dataclass
class SseParser:
    """Feed bytes as they arrive; complete events come out. A cut stream leaves its partial
    event in the buffer, never in ``events`` (as a browser would drop it)."""

    events: list[SseEvent] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    last_event_id: str = ""   # what EventSource would send as Last-Event-ID
    check: bool = True        # edgekb's own events: each checked against the spec
    _buffer: str = ""
    _data: list[str] = field(default_factory=list)
    _event: str = ""
    _id: str | None = None
    _id_buffer: str = ""      # the standard's "last event ID buffer": applied at dispatch
    _decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")())

    _source: object = None  # the response being read: a new one starts with no partial event

    def read_from(self, source: object) -> None:
        """A new connection: whatever a cut left half-received is dropped, as EventSource does."""
        if source is not self._source:
            self._source = source
            self._buffer, self._data, self._event, self._id = "", [], "", None
            self._id_buffer = self.last_event_id
            self._decoder = codecs.getincrementaldecoder("utf-8")()

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._buffer += self._decoder.decode(chunk)
        out: list[SseEvent] = []
        while True:
            cut = min((i for i in (self._buffer.find("\r"), self._buffer.find("\n")) if i >= 0),
                      default=-1)
            if cut < 0 or (self._buffer[cut] == "\r" and cut + 1 == len(self._buffer)):
                break  # no whole line yet (a lone CR may be the start of CRLF)
            line = self._buffer[:cut]
            step = 2 if self._buffer[cut:cut + 2] == "\r\n" else 1
            self._buffer = self._buffer[cut + step:]
            event = self._line(line)
            if event is not None:
                out.append(event)
        self.events.extend(out)
        return out

    def _line(self, line: str) -> SseEvent | None:
        if not line:  # dispatch: only now does the last event id change (a cut id line
            self.last_event_id = self._id_buffer  # without its event must not move it)
            if not self._data:
                self._event, self._id = "", None
                return None
            event = SseEvent("\n".join(self._data), self._event or "message", self._id)
            self._data, self._event, self._id = [], "", None
            if self.check:
                problems = wire.problems(event.data)
                assert not problems, (problems, event.data)
            return event
        if line.startswith(":"):
            self.comments.append(line[1:].strip())
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = self._id_buffer = value
        return None


async def read_events(response: aiohttp.ClientResponse, parser: SseParser | None = None,
                      timeout: float = 10, until: str | None = None) -> SseParser:
    """Read a stream to its end (or to the first event of type ``until``), bounded in time and
    count; a connection that drops ends the read, with what arrived whole."""
    parser = parser or SseParser()
    parser.read_from(response)
    deadline = time.monotonic() + timeout
    for _ in range(MAX_EVENTS):
        try:
            chunk = await asyncio.wait_for(response.content.readany(),
                                           max(0.01, deadline - time.monotonic()))
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
            return parser
        if not chunk:
            return parser
        fresh = parser.feed(chunk)
        if until is not None and any(e.event == until for e in fresh):
            return parser
    raise AssertionError("too many events")


def request_events(parser: SseParser) -> list[dict[str, Any]]:
    """The request's events (those with an id), decoded."""
    return [e.json for e in parser.events if e.id is not None]


def answer_of(frames: list[dict[str, Any]]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "delta")
