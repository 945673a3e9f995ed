"""Bytes on the wire for one whole answer: our WebSocket against OpenAI-style SSE.

Our side is counted for real: a tiny asyncio TCP proxy in front of the server counts every byte
going server -> client on the connection (handshake, welcome, every event, the close frame).
The baseline is the same answer as OpenAI's streaming chat completions would send it over
HTTP/1.1: response headers, then one `chat.completion.chunk` SSE event per token (chunked
transfer encoding), a final chunk with finish_reason, and `data: [DONE]`. No usage chunk
(OpenAI sends it only on request) and no `obfuscation` padding, so the baseline is the leanest
real-world form of that stream.
"""

from __future__ import annotations

import asyncio
import json
import random
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .common import HOST
from .server import ask, connect

PROXY_LIFETIME_S = 600


@dataclass
class CountingProxy:
    """Forwards loopback TCP to ``upstream_port``; counts server -> client bytes."""

    upstream_port: int
    down_bytes: int = 0
    port: int = 0
    _server: asyncio.base_events.Server | None = None
    _open: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def drained(self, timeout: float = 10) -> None:
        """Wait until every proxied connection has ended (both directions at EOF)."""
        if self._open:
            await asyncio.wait(self._open, timeout=timeout)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._open.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.upstream_port)
            await asyncio.wait_for(asyncio.gather(self._pipe(reader, up_writer, False),
                                                  self._pipe(up_reader, writer, True)),
                                   PROXY_LIFETIME_S)
        finally:
            self._open.discard(task)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    downstream: bool) -> None:
        try:
            while data := await src.read(65536):  # ends at EOF; bounded by the lifetime above
                if downstream:
                    self.down_bytes += len(data)
                dst.write(data)
                await dst.drain()
        except ConnectionError:
            pass
        finally:
            dst.close()


def _openai_id() -> str:
    rng = random.Random(7)
    return "chatcmpl-" + "".join(rng.choice(string.ascii_letters + string.digits)
                                 for _ in range(29))


def openai_sse_bytes(pieces: list[str], model: str) -> int:
    """Bytes of one streamed chat completion in OpenAI's format, one event per token."""
    created = int(time.time())
    base = {"id": _openai_id(), "object": "chat.completion.chunk", "created": created,
            "model": model, "system_fingerprint": "fp_b376dfbbd5"}

    def chunk(delta: dict[str, Any], finish: str | None) -> str:
        body = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish}]}
        return "data: " + json.dumps(body, separators=(",", ":"), ensure_ascii=False) + "\n\n"

    events = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    events += [chunk({"content": piece}, None) for piece in pieces]
    events += [chunk({}, "stop"), "data: [DONE]\n\n"]
    headers = ("HTTP/1.1 200 OK\r\n"
               f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime(created))}\r\n"
               "Content-Type: text/event-stream; charset=utf-8\r\n"
               "Transfer-Encoding: chunked\r\n"
               "Connection: keep-alive\r\n"
               "Cache-Control: no-cache\r\n"
               "\r\n")
    total = len(headers.encode())
    for text in events:  # each event is one HTTP chunk: hex size, CRLF, data, CRLF
        data = len(text.encode())
        total += len(f"{data:x}\r\n") + data + 2
    return total + len(b"0\r\n\r\n")


@dataclass(frozen=True)
class WireRun:
    bytes: int
    text: str
    completion_tokens: int
    by_type: dict[str, int]     # JSON payload bytes per event type, as the client decoded them


async def answer_bytes(ws_url_port: int, question: str, compress: int,
                       headers: dict[str, str]) -> WireRun:
    """One whole answer in a new session through the counting proxy."""
    proxy = CountingProxy(ws_url_port)
    await proxy.start()
    try:
        async with aiohttp.ClientSession(headers=headers) as http:
            ws, welcome = await connect(http, f"ws://{HOST}:{proxy.port}/ws", compress=compress)
            answer = await ask(ws, "wire", question)
            await ws.close()
        await proxy.drained()
    finally:
        await proxy.close()
    by_type: dict[str, int] = {"welcome": len(json.dumps(welcome, separators=(",", ":")))}
    for event in answer.events:
        size = len(json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode())
        by_type[event["type"]] = by_type.get(event["type"], 0) + size
    done = answer.done
    return WireRun(proxy.down_bytes, done["text"], done["usage"].get("completion_tokens", 0),
                   by_type)


def compare(run: WireRun, pieces_of: Callable[[str], list[str]], model: str) -> dict[str, Any]:
    pieces = pieces_of(run.text)
    sse = openai_sse_bytes(pieces, model)
    return {"ws_bytes": run.bytes, "sse_bytes": sse, "sse_events": len(pieces) + 3,
            "tokens": run.completion_tokens, "ratio": run.bytes / sse,
            "event_payload_bytes": run.by_type}
