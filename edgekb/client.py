"""`edgekb ask`: a terminal client of protocol edgekb.v2 that survives a dropped link.

When the connection drops it reconnects (with backoff) to the same session and resumes the
request after the last seq it printed, so the answer goes on exactly where it stopped.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import time
from collections.abc import Callable
from typing import Any, TextIO
from urllib.parse import urlencode

import aiohttp

from .events import encode
from .protocol import PROTOCOL

Emit = Callable[[dict[str, Any]], None]
MAX_BACKOFF_S = 5.0


class AnswerPrinter:
    """Human output: sources first, then the answer as it streams, timings on stderr."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out = out
        self.err = err
        self.sources_open = False  # sources printed, the answer not begun

    def __call__(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "source":
            where = f", {message['where']}" if message.get("where") else ""
            relevance = message.get("relevance") or f"score {message.get('score', 0):.2f}"
            self.out.write(f"[{message['n']}] {message['title']}{where}"
                           f" ({message['doc']}, {relevance})\n")
            self.sources_open = True
        elif kind == "delta":
            if self.sources_open:
                self.out.write("\n")
                self.sources_open = False
            self.out.write(message["text"])
        elif kind == "done":
            timings = message.get("timings", {})
            self.out.write("\n")
            self.err.write(f"-- {message['finish']}; first token after "
                           f"{timings.get('ttft_ms')} ms, {timings.get('tokens_per_s')} tokens/s\n")
        elif kind == "error":
            self.err.write(f"error [{message.get('code')}]: {message.get('message')}\n")
        elif kind == "reconnecting":
            self.err.write(f"\n(link lost: {message['reason']}; reconnecting)\n")
        self.out.flush()
        self.err.flush()


def json_printer(out: TextIO) -> Emit:
    def emit(message: dict[str, Any]) -> None:
        out.write(json.dumps(message, ensure_ascii=False) + "\n")
        out.flush()
    return emit


async def ask(url: str, question: str, emit: Emit, timeout_s: float = 900.0,
              max_reconnects: int = 30, token: str | None = None,
              cafile: str | None = None) -> int:
    """Ask one question; 0 when the answer completed, 1 on an error event or giving up.
    ``token`` goes in the Authorization header (never the URL)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    tls = ssl.create_default_context(cafile=cafile) if cafile else None
    request_id = "q-" + secrets.token_hex(4)
    session: str | None = None
    last_seq = 0
    asked = False
    deadline = time.monotonic() + timeout_s
    for attempt in range(max_reconnects + 1):
        target = f"{url}?{urlencode({'session': session})}" if session else url
        try:
            async with aiohttp.ClientSession() as http, http.ws_connect(
                    target, protocols=(PROTOCOL,), heartbeat=30, headers=headers, ssl=tls,
                    timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
                welcome = await _receive(ws, deadline)
                if session is None:
                    session = welcome["session"]
                    emit(welcome)
                if asked:
                    await ws.send_str(encode({"type": "resume", "id": request_id,
                                              "after": last_seq}))
                else:
                    await ws.send_str(encode({"type": "ask", "id": request_id,
                                              "text": question}))
                    asked = True
                while True:
                    message = await _receive(ws, deadline)
                    if message.get("id") != request_id:
                        if message["type"] == "error" and message.get("code") == "unknown_request":
                            continue
                        emit(message)  # notices and the like
                        continue
                    if message["type"] == "error" and message.get("code") == "unknown_request":
                        # The link dropped before the server took the question: ask again.
                        await ws.send_str(encode({"type": "ask", "id": request_id,
                                                  "text": question}))
                        continue
                    if message.get("seq", 0) <= last_seq:
                        continue  # never print an event twice
                    last_seq = message["seq"]
                    emit(message)
                    if message["type"] in ("done", "error"):
                        return 0 if message["type"] == "done" else 1
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):  # retrying cannot help: say why and stop
                emit({"type": "error", "code": "unauthorized" if exc.status == 401
                      else "forbidden", "message": f"the server refused the connection "
                      f"({exc.status}); pass --token or set EDGEKB_TOKEN"})
                return 1
            if time.monotonic() >= deadline or attempt == max_reconnects:
                emit({"type": "error", "code": "gave_up", "message": f"link lost: {exc}"})
                return 1
            await asyncio.sleep(min(MAX_BACKOFF_S, 0.25 * 2 ** attempt))
        except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError, _Closed) as exc:
            if time.monotonic() >= deadline or attempt == max_reconnects:
                emit({"type": "error", "code": "gave_up", "message": f"link lost: {exc}"})
                return 1
            if asked or session:
                emit({"type": "reconnecting", "reason": str(exc) or type(exc).__name__,
                      "after": last_seq})
            await asyncio.sleep(min(MAX_BACKOFF_S, 0.25 * 2 ** attempt))
    return 1


class _Closed(Exception):
    pass


async def _receive(ws: aiohttp.ClientWebSocketResponse, deadline: float) -> dict[str, Any]:
    msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
    if msg.type != aiohttp.WSMsgType.TEXT:
        raise _Closed(f"connection closed ({ws.close_code})")
    return json.loads(msg.data)
