"""The WebSocket transport: moves protocol events, computes nothing.

One task reads the socket; each request runs in its own task and hands its events to a single
writer task through a bounded queue, so a slow reader makes its own requests wait (back-pressure)
and never blocks the LLM worker, which feeds each request through its own queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

from aiohttp import WSMsgType, web

from . import __version__, keys
from .answer import AnswerEngine, AnswerOptions
from .errors import EdgekbError, ProtocolError
from .protocol import (
    ID_REUSE, PROTOCOL, UNKNOWN_REQUEST, Ask, Cancel, Ping, encode, error_event,
    event, parse_client_message,
)

log = logging.getLogger(__name__)

OUTBOX_FRAMES = 256
# aiohttp's own cap, far above ours: frames between the two get a typed too_large error and the
# connection lives on; only absurd frames make aiohttp close the socket.
HARD_FRAME_CAP = 4 * 1024 * 1024


class Connection:
    def __init__(self, ws: web.WebSocketResponse, answers: AnswerEngine,
                 options: AnswerOptions, max_message_bytes: int) -> None:
        self.ws = ws
        self.answers = answers
        self.options = options
        self.max_message_bytes = max_message_bytes
        self.outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(OUTBOX_FRAMES)
        self.requests: dict[str, tuple[asyncio.Task[None], threading.Event]] = {}

    async def send(self, message: dict[str, Any]) -> None:
        await self.outbox.put(message)

    async def write_loop(self) -> None:
        while (message := await self.outbox.get()) is not None:
            if self.ws.closed:
                return
            await self.ws.send_str(encode(message))

    async def handle(self, raw: str | bytes) -> None:
        try:
            message = parse_client_message(raw, self.max_message_bytes)
        except ProtocolError as exc:
            await self.send(error_event(exc))
            return
        if isinstance(message, Ping):
            await self.send(event("pong"))
        elif isinstance(message, Ask):
            await self._ask(message)
        elif isinstance(message, Cancel):
            running = self.requests.get(message.id)
            if running is None:
                await self.send(error_event(ProtocolError(
                    UNKNOWN_REQUEST, f"no running request {message.id!r}"), id=message.id))
            else:
                running[1].set()

    async def _ask(self, ask: Ask) -> None:
        if ask.id in self.requests:
            await self.send(error_event(ProtocolError(
                ID_REUSE, f"request id {ask.id!r} is already running"), id=ask.id))
            return
        cancel = threading.Event()
        task = asyncio.create_task(self._run(ask, cancel))
        self.requests[ask.id] = (task, cancel)
        task.add_done_callback(lambda _: self.requests.pop(ask.id, None))

    async def _run(self, ask: Ask, cancel: threading.Event) -> None:
        seq = 0
        try:
            async for item in self.answers.answer(ask.text, self.options, cancel):
                seq += 1
                await self.send({**item, "id": ask.id, "seq": seq})
        except EdgekbError as exc:
            await self.send(error_event(exc, id=ask.id, seq=seq + 1))
        except Exception:
            log.exception("request %s failed", ask.id)
            await self.send(error_event(EdgekbError("internal error"), id=ask.id, seq=seq + 1))

    async def close(self) -> None:
        for task, cancel in list(self.requests.values()):
            cancel.set()
            task.cancel()
        await asyncio.gather(*(t for t, _ in self.requests.values()), return_exceptions=True)


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    app = request.app
    settings = app[keys.SETTINGS]
    ws = web.WebSocketResponse(protocols=(PROTOCOL,), heartbeat=settings.server.heartbeat_s,
                               max_msg_size=max(HARD_FRAME_CAP, settings.server.max_message_bytes))
    await ws.prepare(request)
    app[keys.SOCKETS].add(ws)
    options = AnswerOptions(k=settings.retrieval.k, max_tokens=settings.generation.max_tokens,
                            temperature=settings.generation.temperature,
                            flush_interval_s=settings.server.flush_interval_ms / 1000)
    conn = Connection(ws, app[keys.ANSWERS], options, settings.server.max_message_bytes)
    writer = asyncio.create_task(conn.write_loop())
    await conn.send(event("welcome", protocol=PROTOCOL, server=f"edgekb {__version__}",
                          limits={"max_message_bytes": settings.server.max_message_bytes}))
    try:
        async for msg in ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                await conn.handle(msg.data)
    finally:
        await conn.close()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
    return ws
