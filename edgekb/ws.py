"""The WebSocket transport of protocol edgekb.v2: moves frames, computes nothing.

One task reads the socket and turns each frame into a call of the conversation core
(conversations.py). A connection follows each request it asked or resumed with one task that
reads the request's log from a cursor and hands frames to this connection's single writer
through a small bounded queue. A slow reader therefore slows only its own followers, and a send
that stays blocked for send_timeout_s drops the connection (close 4010): the client resumes
where it stopped. One sweeper task (``sweep``) checks every connection's heartbeat and idle time.

Whatever ends a connection (the peer, the writer, the heartbeat, a take-over, shutdown) ends all
of its tasks, and the close never waits long on a peer that does not read: after CLOSE_WAIT_S
the socket is aborted, so a stalled client holds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from . import __version__, events, keys, logs
from .access import ACCESS, CLIENT_ADDRESS, CLOSE_CODE, PRINCIPAL
from .conversations import Conversations, Opened
from .errors import EdgekbError
from .heartbeat import Heartbeat, sweep_step
from .identity import user_of
from .protocol import (
    CLOSE_IDLE,
    CLOSE_RATE_LIMITED,
    CLOSE_TAKEN_OVER,
    CLOSE_TOO_SLOW,
    CLOSE_UNAUTHORIZED,
    PROTOCOL,
    Ask,
    Cancel,
    Hello,
    History,
    Ping,
    Resume,
    Typing,
    parse_client_message,
    valid_client_id,
)

log = logging.getLogger(__name__)

OUTBOX_FRAMES = 64
# aiohttp's own cap, far above ours: frames between the two get a typed too_large error and the
# connection lives on; only absurd frames make aiohttp close the socket.
HARD_FRAME_CAP = 4 * 1024 * 1024
CLOSE_WAIT_S = 5.0  # for the close handshake; then the socket is aborted
# A client that keeps asking while refused for its rate is a runaway script: close it (4029).
MAX_RATE_REFUSALS = 10


class Connection:
    def __init__(self, request: web.Request, ws: web.WebSocketResponse, user: str,
                 opened: Opened) -> None:
        self.app = request.app
        self.address = request.get(CLIENT_ADDRESS, request.remote or "")
        self.principal = request[PRINCIPAL]
        self.authority = request.app[ACCESS].authority
        self.rate_refusals = 0  # in a row
        self.settings = request.app[keys.SETTINGS]
        self.core: Conversations = request.app[keys.CONVERSATIONS]
        self.ws = ws
        self.user = user
        self.session_id = opened.session
        self.client_id: str | None = None
        self.outbox: asyncio.Queue[str] = asyncio.Queue(OUTBOX_FRAMES)
        self.followers: dict[str, asyncio.Task[None]] = {}
        # Idle time counts from the client's last frame or the end of the last answer sent.
        self.last_active = time.monotonic()
        server = self.settings.server
        self.heartbeat = Heartbeat(server.heartbeat_s, server.pong_timeout_s,
                                   request.transport.get_extra_info("socket")
                                   if request.transport else None)
        self._pinging: asyncio.Task[None] | None = None
        # Set once, by whatever ends the connection first: the close code and reason to send.
        self.ending: asyncio.Future[tuple[int, bytes]] = \
            asyncio.get_running_loop().create_future()

    def end(self, code: int, reason: bytes) -> None:
        """Ask the connection's handler to close (from any task; the first reason wins)."""
        if not self.ending.done():
            self.ending.set_result((code, reason))

    async def send(self, message: dict[str, Any]) -> None:
        await self.outbox.put(events.encode(message))

    def offer(self, message: dict[str, Any]) -> None:
        """A frame that may be dropped (a hint): never waits on a full outbox."""
        with contextlib.suppress(asyncio.QueueFull):
            self.outbox.put_nowait(events.encode(message))

    async def send_frame(self, frame: str) -> None:
        """An event already encoded (a request's events are encoded once, for everyone)."""
        await self.outbox.put(frame)

    async def write_loop(self) -> None:
        timeout = self.settings.server.send_timeout_s
        loop = asyncio.get_running_loop()
        while True:
            frame = await self.outbox.get()
            # A send waits only while the peer's buffers are full. A timer bounds that wait:
            # when it fires, `end` closes the connection and the handler cancels this loop.
            # (Not a task per frame under asyncio.wait, nor wait_for, which before Python 3.12
            # swallows a cancellation that arrives as the send completes. With 100 followers
            # the task per frame was a third of the event loop's CPU.)
            watchdog = loop.call_later(timeout, self.end, CLOSE_TOO_SLOW,
                                       b"too slow; resume later")
            try:
                await self.ws.send_str(frame)
            except ConnectionError:
                self.end(WSCloseCode.ABNORMAL_CLOSURE, b"")
                return
            finally:
                watchdog.cancel()

    async def welcome(self, opened: Opened) -> None:
        server = self.settings.server
        await self.send(events.welcome(
            session=opened.session, resumed=opened.resumed, protocol=PROTOCOL,
            server=f"edgekb {__version__}", running=opened.running,
            limits={"max_message_bytes": server.max_message_bytes,
                    "idle_timeout_s": server.idle_timeout_s},
            heartbeat={"interval_s": server.heartbeat_s, "timeout_s": server.pong_timeout_s}))

    async def handle(self, raw: str | bytes) -> None:
        self.last_active = time.monotonic()
        # The credential that opened the connection may have expired or been revoked since.
        if self.authority is not None and not self.authority.still_valid(self.principal):
            self.end(CLOSE_UNAUTHORIZED, b"sign in again")
            return
        try:
            await self._dispatch(parse_client_message(raw, self.settings.server.max_message_bytes))
            self.rate_refusals = 0
        except EdgekbError as exc:
            await self.send(events.error(exc))
            self.rate_refusals = self.rate_refusals + 1 if exc.code == "rate_limited" else 0
            if self.rate_refusals >= MAX_RATE_REFUSALS:
                self.end(CLOSE_RATE_LIMITED, b"too many questions; slow down")
        except Exception:  # a bug: the client gets `internal`, the connection lives on
            log.exception("handling a frame of session %s failed", self.session_id)
            await self.send(events.error(EdgekbError("internal error")))

    async def _dispatch(self, message: object) -> None:
        if isinstance(message, Ping):
            await self.send(events.pong())
        elif isinstance(message, Ask):
            await self.core.ask(self.session_id, self.user, message.id, message.text,
                                message.kbs, address=self.address)
            self._follow(message.id, 0)
        elif isinstance(message, Cancel):
            await self.core.cancel(self.session_id, message.id, user=self.user,
                                   address=self.address)
        elif isinstance(message, Resume):
            self._follow(message.id, message.after)
        elif isinstance(message, Hello):
            await self._hello(message)
        elif isinstance(message, Typing):
            self.core.typing(self, message.text, message.kbs, self.offer)
        elif isinstance(message, History):
            turns, more = await self.core.history(self.session_id, message.before,
                                                  message.limit)
            await self.send(events.history(self.session_id, [t.to_wire() for t in turns], more))

    async def _hello(self, hello: Hello) -> None:
        await self.close_followers()
        opened = await self.core.open(self.user, hello.session)
        self.session_id = opened.session
        self.client_id = hello.client
        if hello.client:
            _take_over(self.app, self)
        await self.welcome(opened)
        for resume in hello.resume:
            self._follow(resume.id, resume.after)

    def _follow(self, request_id: str, after: int) -> None:
        if request_id in self.followers:
            self.followers.pop(request_id).cancel()
        task = asyncio.create_task(self._follow_task(request_id, after))
        self.followers[request_id] = task
        task.add_done_callback(lambda t: self._followed(request_id, t))

    def _followed(self, request_id: str, task: asyncio.Task[None]) -> None:
        if self.followers.get(request_id) is task:
            self.followers.pop(request_id)
        self.last_active = time.monotonic()

    async def _follow_task(self, request_id: str, after: int) -> None:
        try:
            await self.core.follow(self.session_id, request_id, after, self.send_frame)
        except EdgekbError as exc:
            await self.send(events.error(exc))

    def check(self, now: float) -> None:
        """The sweeper's look at this connection: ping, or end it when dead or idle."""
        if self.ending.done():
            return
        state = self.heartbeat.check(now)
        if state == "dead":
            log.info("peer of session %s is gone: closing", self.session_id)
            self.core.metrics.heartbeat_closed("ws")
            self.end(WSCloseCode.GOING_AWAY, b"no heartbeat")
        elif state == "ping" and (self._pinging is None or self._pinging.done()):
            self._pinging = asyncio.create_task(self._ping())
        limit = self.settings.server.idle_timeout_s
        # Not while an answer is followed or its last frames still wait in the outbox.
        if limit > 0 and now - self.last_active > limit and not self.followers \
                and self.outbox.empty():
            self.end(CLOSE_IDLE, b"idle timeout")

    async def _ping(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.ping()

    async def close_followers(self) -> None:
        tasks = list(self.followers.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _take_over(app: web.Application, newcomer: Connection) -> None:
    """A client reconnecting with the same client id replaces its older connection at once:
    on flaky Wi-Fi the old one is usually dead but not yet detected."""
    for other in list(app[keys.CONNECTIONS]):
        if other is not newcomer and other.client_id == newcomer.client_id \
                and other.session_id == newcomer.session_id:
            other.end(CLOSE_TAKEN_OVER, b"taken over by a newer connection")


async def sweep(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: one task looks at every connection's heartbeat and idle time."""
    server = app[keys.SETTINGS].server
    step = sweep_step(server.heartbeat_s, server.pong_timeout_s)

    async def loop() -> None:
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            for conn in list(app[keys.CONNECTIONS]):
                conn.check(now)

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _read(conn: Connection) -> None:
    async for msg in conn.ws:
        conn.heartbeat.saw_inbound()
        if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            await conn.handle(msg.data)
        elif msg.type == WSMsgType.PING:
            await conn.ws.pong(msg.data)


async def _stop(tasks: list[asyncio.Task[None]], session_id: str) -> None:
    """Cancel a connection's tasks and wait for them, but never long: the close frame must
    not wait on a task that does not end when cancelled (that would be a bug, logged)."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=CLOSE_WAIT_S)
    for task in pending:
        log.error("a task of a connection of session %s ignores its cancellation: %r",
                  session_id, task)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.error("a task of a connection of session %s failed", session_id,
                      exc_info=task.exception())


async def _close(ws: web.WebSocketResponse, transport: asyncio.Transport | None,
                 code: int, reason: bytes) -> None:
    """Send the close frame and wait for the reply, but never long: a peer that does not
    read would hold the socket and its buffers until TCP gives up (many minutes)."""
    # A task, not wait_for: after a send timeout aiohttp's shared drain future is cancelled,
    # and close() then raises CancelledError, which must not pass for our own cancellation.
    closing = asyncio.create_task(ws.close(code=code, message=reason))
    closing.add_done_callback(lambda t: t.cancelled() or t.exception())
    done, _ = await asyncio.wait([closing], timeout=CLOSE_WAIT_S)
    if not done:
        closing.cancel()
    if transport is not None and (not done or transport.get_write_buffer_size()):
        _reset(transport)


def _reset(transport: asyncio.Transport) -> None:
    """Drop the connection with a TCP reset: a plain close would leave the kernel sending the
    queued bytes (and holding their buffers) to a peer that does not read, for minutes."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    # Every log line of this connection's tasks carries its id (the task ends with the socket).
    logs.connection_id.set(logs.new_connection_id())
    app = request.app
    settings = app[keys.SETTINGS]
    user = user_of(request)  # the access middleware admitted this request
    opened = await app[keys.CONVERSATIONS].open(user, request.query.get("session"))
    ws = web.WebSocketResponse(
        protocols=(PROTOCOL,), autoping=False, compress=settings.server.compress,
        max_msg_size=max(HARD_FRAME_CAP, settings.server.max_message_bytes))
    await ws.prepare(request)
    conn = Connection(request, ws, user, opened)
    # `?client=` names the client in the handshake, as `hello` does: a page that reconnects
    # takes its dead connection over without a second welcome (bytes count on a bad link).
    client = request.query.get("client")
    if client and valid_client_id(client):
        conn.client_id = client
        _take_over(app, conn)
    # A plain set, not a WeakSet: a closed connection leaves at once (its reference cycles would
    # keep it in a WeakSet until the garbage collector runs, pinged and counted meanwhile).
    app[keys.CONNECTIONS].add(conn)
    log.info("connection from %s, session %s", request.remote, opened.session)
    tasks = [asyncio.create_task(conn.write_loop()), asyncio.create_task(_read(conn))]
    try:
        await conn.welcome(opened)
        # The reader ends when the peer closes; the others end the connection through `end`.
        await asyncio.wait([*tasks, conn.ending], return_when=asyncio.FIRST_COMPLETED)
    finally:
        # The reader first: a frame it still handled could otherwise start a new follower
        # (or leave typing text behind).
        await _stop(tasks, conn.session_id)
        app[keys.CONVERSATIONS].gone(conn)
        await _stop(list(conn.followers.values()), conn.session_id)
        app[keys.CONNECTIONS].discard(conn)
        code, reason = conn.ending.result() if conn.ending.done() else (WSCloseCode.OK, b"")
        request[CLOSE_CODE] = code  # for the audit line of the disconnect
        await _close(ws, request.transport, code, reason)  # type: ignore[arg-type]
    return ws
