"""Server-sent events: a request's events over plain HTTP, resumable from any seq.

    POST /api/ask                                    {text, session?, id?, kbs?, options?}
    GET  /api/sessions/{session}/requests/{request}/events   Last-Event-ID or ?after=N
    POST /api/sessions/{session}/requests/{request}/cancel
    GET  /api/sessions/{session}/turns?before=&limit=

With ``Accept: text/event-stream`` an answer streams as its log is stored: every event is
``id: <seq>``, ``event: <type>``, ``data: <the same JSON frame the WebSocket carries>``, so a
client may start on one transport and resume on the other. The first event (``request``, no
id) names the session and the request, as do the ``Edgekb-Session`` and ``Edgekb-Request``
headers. Without that Accept header the route answers one JSON document when the answer is
done. A transport only: every call goes to the conversation core.

The framing is written here, not with aiohttp-sse: our events are already encoded once for
every transport, and their ``id`` is the log's seq, so the framing is three lines; what a
stream needs beyond it is one writer (``EventStream``) that sends a comment only when the
stream has been quiet for ``http.heartbeat_s`` (aiohttp-sse pings on a fixed timer from a second
writer task, whatever else is sent: bytes a thin link pays for nothing), bounds every write by
``server.send_timeout_s`` like the WebSocket writer, and lets shutdown end a stream before the
core interrupts its answer. aiohttp-sse's one extra, TCP_USER_TIMEOUT, is borrowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Mapping
from typing import Any

from aiohttp import web

from . import events, keys
from .conversations import Conversations, RequestOptions
from .errors import EdgekbError, NotFound, ProtocolError
from .http_errors import STATUS_BY_CODE, error_response
from .protocol import (
    BAD_JSON,
    INVALID_FIELD,
    MAX_HISTORY,
    UNKNOWN_REQUEST,
    Ask,
    parse_client_message,
)
from .access import requires
from .requester import client_address, user_of

log = logging.getLogger(__name__)

SESSION_HEADER = "Edgekb-Session"
REQUEST_HEADER = "Edgekb-Request"
EVENT_STREAM = "text/event-stream"
# Proxies (nginx) buffer responses unless told not to; a cached stream would replay stale text.
STREAM_HEADERS = {"Content-Type": f"{EVENT_STREAM}; charset=utf-8", "Cache-Control": "no-cache",
                  "X-Accel-Buffering": "no"}
HEARTBEAT = b": keep-alive\n\n"
CLOSE_WAIT_S = 1.0  # shutdown waits this long for streams to end before the core stops
MAX_ANSWER_FRAMES = 100_000  # bound on frames one JSON answer collects (a long answer: ~2,000)
_TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)

Fields = Mapping[str, Any]


class StreamGone(Exception):
    """The client is gone or stalled: the stream ends, the answer goes on for others."""


class EventStream:
    """One text/event-stream response: one writer, comment heartbeats when quiet, every write
    bounded in time. ``ended`` is set when the client went away or shutdown ends the stream."""

    def __init__(self, request: web.Request, kind: str, headers: Mapping[str, str]) -> None:
        settings = request.app[keys.SETTINGS]
        self.request = request
        self.kind = kind  # sse | openai: the metrics' transport
        self.heartbeat_s = settings.http.heartbeat_s
        self.send_timeout_s = settings.server.send_timeout_s
        self.response = web.StreamResponse(headers={**STREAM_HEADERS, **headers})
        self.ended = asyncio.Event()  # stop streaming: the client is gone, or shutdown
        self.gone = False             # the client is gone: nothing more can be written
        self._lock = asyncio.Lock()
        self._last_write = time.monotonic()
        self._beat: asyncio.Task[None] | None = None
        self._saved_user_timeout: int | None = None

    async def open(self) -> None:
        await self.response.prepare(self.request)
        self._set_user_timeout()
        self.request.app[keys.STREAMS].add(self)
        self._beat = asyncio.create_task(self._heartbeats())

    async def event(self, data: str, *, event: str | None = None, seq: int | None = None) -> None:
        """One event; ``data`` is one line of JSON (json.dumps escapes every line break)."""
        head = (f"id: {seq}\n" if seq is not None else "") + (f"event: {event}\n" if event else "")
        await self._write(f"{head}data: {data}\n\n".encode())

    async def close(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            await asyncio.gather(self._beat, return_exceptions=True)
        self.request.app[keys.STREAMS].discard(self)
        if not self.gone:
            with contextlib.suppress(ConnectionError, RuntimeError, asyncio.TimeoutError):
                await asyncio.wait_for(self.response.write_eof(), self.send_timeout_s)
        self._restore_user_timeout()
        self.ended.set()

    async def _write(self, data: bytes) -> None:
        if self.gone:
            raise StreamGone
        async with self._lock:
            try:
                await asyncio.wait_for(self.response.write(data), self.send_timeout_s)
            except asyncio.TimeoutError:
                log.info("an event stream stalled for %.0f s: dropped", self.send_timeout_s)
                self.request.app[keys.METRICS].heartbeat_closed(self.kind)
                self._abort()
                raise StreamGone from None
            except (ConnectionError, RuntimeError):  # closed by the peer, or after write_eof
                self.gone = True
                self.ended.set()
                raise StreamGone from None
            self._last_write = time.monotonic()

    async def _heartbeats(self) -> None:
        """A comment whenever nothing was sent for heartbeat_s: proxies close silent streams
        (a long queue wait, a long prompt read), and a write is how a gone client is found."""
        while not self.ended.is_set():
            quiet = time.monotonic() - self._last_write
            if quiet < self.heartbeat_s:
                await asyncio.sleep(self.heartbeat_s - quiet)
                continue
            try:
                await self._write(HEARTBEAT)
            except StreamGone:
                return

    def _abort(self) -> None:
        self.gone = True
        self.ended.set()
        if self.request.transport is not None:
            self.request.transport.abort()

    def _set_user_timeout(self) -> None:
        """Let the kernel drop the connection when sent data stays unacknowledged for the send
        timeout, so a peer that vanished (no FIN) is found without waiting for TCP's minutes."""
        sock = self._socket()
        if sock is None or _TCP_USER_TIMEOUT is None:
            return
        with contextlib.suppress(OSError):
            self._saved_user_timeout = sock.getsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT,
                            int(self.send_timeout_s * 1000))

    def _restore_user_timeout(self) -> None:
        sock = self._socket()
        if sock is not None and self._saved_user_timeout is not None and sock.fileno() >= 0:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT,  # type: ignore[arg-type]
                                self._saved_user_timeout)
        self._saved_user_timeout = None

    def _socket(self) -> socket.socket | None:
        transport = self.request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        return sock if sock is not None and sock.family in (socket.AF_INET,
                                                            socket.AF_INET6) else None


async def until_ended(stream: EventStream, work: Awaitable[None]) -> None:
    """Run ``work`` (a follow) until it returns, or until the stream ends first (the client went
    away, shutdown): then it is cancelled, and the answer goes on without this follower."""
    task = asyncio.ensure_future(work)
    ended = asyncio.ensure_future(stream.ended.wait())
    try:
        await asyncio.wait([task, ended], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, ended):
            pending.cancel()
        await asyncio.gather(task, ended, return_exceptions=True)
    if task.done() and not task.cancelled() and isinstance(task.exception(), EdgekbError):
        raise task.exception()  # type: ignore[misc]


async def close_streams(app: web.Application) -> None:
    """on_shutdown, before the core interrupts running answers: end every stream, so clients
    resume after the restart and read how their answer ended from the log."""
    streams = list(app[keys.STREAMS])
    for stream in streams:
        stream.ended.set()
    deadline = time.monotonic() + CLOSE_WAIT_S
    for _ in range(int(CLOSE_WAIT_S / 0.02) + 1):
        if not app[keys.STREAMS] or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.02)


# --- requests ----------------------------------------------------------------------------------

def new_request_id() -> str:
    return "h" + secrets.token_hex(6)


def wants_stream(request: web.Request) -> bool:
    return EVENT_STREAM in request.headers.get("Accept", "")


def named(session: str, request_id: str) -> dict[str, str]:
    return {SESSION_HEADER: session, REQUEST_HEADER: request_id}


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object (bounded by the app's client_max_size), or a typed error."""
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(BAD_JSON, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(BAD_JSON, "JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise ProtocolError(BAD_JSON, "the body must be a JSON object")
    return body


def check_fields(body: Fields, allowed: set[str], prefix: str = "") -> None:
    """Refuse unknown fields: a misspelt option must not pass for the default."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        name = prefix + unknown[0]
        raise ProtocolError(INVALID_FIELD, f"{name}: unknown field (known: "
                            f"{', '.join(sorted(allowed))})", field=name)


def parse_question(request_id: str, text: Any, kbs: Any) -> Ask:
    """The same checks as a WebSocket `ask` (protocol.py): id, text length, knowledge bases."""
    frame = {"type": "ask", "id": request_id, "text": text}
    if kbs is not None:
        frame["kbs"] = kbs
    raw = json.dumps(frame)  # the body's size is bounded already (client_max_size)
    message = parse_client_message(raw, len(raw.encode()))
    assert isinstance(message, Ask)
    return message


def switch(options: Any, name: str, default: bool) -> bool:
    value = options.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolError(INVALID_FIELD, f"options.{name}: expected true or false",
                            field=f"options.{name}")
    return value


def parse_after(request: web.Request) -> int:
    """Last-Event-ID (what EventSource sends when it reconnects) or ?after=, 0 for all."""
    raw = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
    if not raw.isascii() or not raw.isdigit() or len(raw) > 15:
        raise ProtocolError(INVALID_FIELD, "Last-Event-ID / after: expected the last seq "
                            "received (an integer >= 0)", field="after")
    return int(raw)


class Answer:
    """The answer gathered from a request's events, for the JSON (non-streaming) form."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.sources: list[dict[str, Any]] = []
        self.last: dict[str, Any] = {}
        self.frames = 0

    async def add(self, frame: str) -> None:
        self.frames += 1
        if self.frames > MAX_ANSWER_FRAMES:
            raise StreamGone
        event = json.loads(frame)
        kind = event["type"]
        if kind == "delta":
            self.text.append(event["text"])
        elif kind == "source":
            self.sources.append({k: v for k, v in event.items() if k not in ("type", "id", "seq")})
        elif kind in ("done", "error"):
            self.last = event

    def document(self, session: str, request_id: str) -> web.Response:
        headers = named(session, request_id)
        text = "".join(self.text)
        last = self.last
        if last.get("type") != "done":
            fields = {k: v for k, v in last.items() if k not in ("type", "code", "message")}
            code = last.get("code", "internal")
            # The error event's fields, and the answer as far as it was written.
            response = error_response(STATUS_BY_CODE.get(code, 500), code,
                                      last.get("message", "the answer ended without its end"),
                                      **fields, session=session, answer=text)
            response.headers.update(headers)
            return response
        return web.json_response(
            {"session": session, "id": request_id, "text": text, "sources": self.sources,
             **{k: last[k] for k in ("finish", "chars", "sha256", "usage", "timings")}},
            headers=headers)


async def stream_events(request: web.Request, core: Conversations, session: str,
                        request_id: str, after: int) -> web.StreamResponse:
    """The request's events after ``after`` as text/event-stream, live to its end."""
    stream = EventStream(request, "sse", named(session, request_id))
    await stream.open()

    async def send(frame: str) -> None:
        event = json.loads(frame)
        await stream.event(frame, event=event["type"], seq=event.get("seq"))

    try:
        await stream.event(events.encode(events.request(session, request_id, after)),
                           event="request")
        await until_ended(stream, core.follow(session, request_id, after, send))
    except StreamGone:
        pass
    except EdgekbError as exc:  # after the headers: the error is the stream's last event
        with contextlib.suppress(StreamGone):
            await stream.event(events.encode(events.error(exc)), event="error")
    finally:
        await stream.close()
    return stream.response


async def collect(core: Conversations, session: str, request_id: str, after: int) -> Answer:
    answer = Answer()
    await core.follow(session, request_id, after, answer.add)
    return answer


# --- handlers ----------------------------------------------------------------------------------

@requires("user", audit="ask")  # any signed-in user may ask; a POST is admin-only otherwise
async def ask(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    check_fields(body, {"text", "session", "id", "kbs", "options"})
    request_id = body.get("id") or new_request_id()
    question = parse_question(request_id, body.get("text"), body.get("kbs"))
    options = body.get("options", {})
    if not isinstance(options, dict):
        raise ProtocolError(INVALID_FIELD, "options: expected an object", field="options")
    check_fields(options, {"retrieval"}, "options.")
    retrieval = switch(options, "retrieval", True)
    session = body.get("session")
    if session is not None and not isinstance(session, str):
        raise ProtocolError(INVALID_FIELD, "session: expected a session id", field="session")
    core = request.app[keys.CONVERSATIONS]
    user = user_of(request)
    opened = await core.open(user, session)
    await core.ask(opened.session, user, question.id, question.text, question.kbs,
                   RequestOptions(retrieval=retrieval), address=client_address(request))
    if wants_stream(request):
        return await stream_events(request, core, opened.session, question.id, 0)
    return (await collect(core, opened.session, question.id, 0)).document(opened.session,
                                                                          question.id)


async def request_events(request: web.Request) -> web.StreamResponse:
    session, request_id = request.match_info["session"], request.match_info["request"]
    after = parse_after(request)
    core = request.app[keys.CONVERSATIONS]
    state = await core.state(session, user_of(request), request_id)
    if state is None:
        raise ProtocolError(UNKNOWN_REQUEST, f"no request {request_id!r} in this session",
                            id=request_id)
    if not wants_stream(request):
        return (await collect(core, session, request_id, after)).document(session, request_id)
    if state.state != "running" and after >= state.last_seq:
        # Nothing more will come: 204 tells EventSource to stop reconnecting.
        return web.Response(status=204, headers=named(session, request_id))
    return await stream_events(request, core, session, request_id, after)


@requires("user", audit="cancel")
async def cancel_request(request: web.Request) -> web.Response:
    session, request_id = request.match_info["session"], request.match_info["request"]
    core = request.app[keys.CONVERSATIONS]
    if await core.state(session, user_of(request), request_id) is None:
        raise ProtocolError(UNKNOWN_REQUEST, f"no request {request_id!r} in this session",
                            id=request_id)
    await core.cancel(session, request_id, user=user_of(request),
                      address=client_address(request))
    return web.json_response({"session": session, "id": request_id, "cancelling": True},
                             status=202, headers=named(session, request_id))


async def session_turns(request: web.Request) -> web.Response:
    session = request.match_info["session"]
    core = request.app[keys.CONVERSATIONS]
    opened = await core.open(user_of(request), session)
    if opened.session != session or not opened.resumed:
        raise NotFound(f"no session {session!r}")
    before = _query_int(request, "before", 1, 1 << 53, None)
    limit = _query_int(request, "limit", 1, MAX_HISTORY, 20)
    turns, more = await core.history(session, before, limit)
    return web.json_response({"session": session, "turns": [t.to_wire() for t in turns],
                              "more": more})


def _query_int(request: web.Request, name: str, low: int, high: int,
               default: int | None) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and low <= int(raw) <= high):
        raise ProtocolError(INVALID_FIELD, f"{name}: expected an integer from {low} to {high}",
                            field=name)
    return int(raw)


def setup_sse(app: web.Application) -> None:
    app[keys.STREAMS] = set()
    app.router.add_post("/api/ask", ask)
    ids = "{session:[A-Za-z0-9_-]{8,64}}/requests/{request:[A-Za-z0-9_.:-]{1,64}}"
    app.router.add_get(f"/api/sessions/{ids}/events", request_events)
    app.router.add_post(f"/api/sessions/{ids}/cancel", cancel_request)
    app.router.add_get("/api/sessions/{session:[A-Za-z0-9_-]{8,64}}/turns", session_turns)
