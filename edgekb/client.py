"""`edgekb ask`: a terminal client of the WebSocket protocol."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

import aiohttp

from .protocol import PROTOCOL, encode


class AnswerPrinter:
    """Human output: sources first, then the answer as it streams, timings on stderr."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out = out
        self.err = err

    def __call__(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "sources":
            for source in message["sources"]:
                where = f", {source['where']}" if source.get("where") else ""
                self.out.write(f"[{source['n']}] {source['title']}{where}"
                               f" ({source['doc']}, score {source['score']:.2f})\n")
            self.out.write("\n")
        elif kind == "delta":
            self.out.write(message["text"])
        elif kind == "done":
            timings = message.get("timings", {})
            self.out.write("\n")
            self.err.write(f"-- {message['finish']}; first token after "
                           f"{timings.get('ttft_ms')} ms, {timings.get('tokens_per_s')} tokens/s\n")
        elif kind == "error":
            self.err.write(f"error [{message.get('code')}]: {message.get('message')}\n")
        self.out.flush()


def json_printer(out: TextIO) -> Any:
    def emit(message: dict[str, Any]) -> None:
        out.write(json.dumps(message, ensure_ascii=False) + "\n")
        out.flush()
    return emit


async def ask(url: str, question: str, emit: Any, timeout_s: float = 600.0) -> int:
    """Ask one question; returns 0 when the answer completed, 1 on an error event."""
    request_id = "q1"
    client_timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        async with session.ws_connect(url, protocols=(PROTOCOL,), heartbeat=30) as ws:
            await ws.send_str(encode({"type": "ask", "id": request_id, "text": question}))
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                message = json.loads(msg.data)
                emit(message)
                if message.get("id") == request_id and message["type"] in ("done", "error"):
                    return 0 if message["type"] == "done" else 1
    sys.stderr.write("error: the server closed the connection before the answer ended\n")
    return 1
