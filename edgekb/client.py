"""`edgekb ask`: a terminal client of protocol edgekb.v2 that survives a dropped link.

- When the connection drops it reconnects (with backoff) to the same session and resumes after
  the last seq it printed, so the answer goes on exactly where it stopped.
- A server that cannot be reached before any success fails within seconds, saying what to
  check (an appliance that is down is not a flaky link).
- Ctrl-C sends `cancel`, so the appliance's one model slot is free at once, and prints how the
  answer ended; a second Ctrl-C quits at once.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import time
from collections.abc import Callable
from typing import Any, TextIO
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp

from .events import encode
from .protocol import PROTOCOL

Emit = Callable[[dict[str, Any]], None]
MAX_BACKOFF_S = 5.0
CONNECT_TRIES = 3          # before any success: then the server is taken to be down
CONNECT_TIMEOUT_S = 5.0
EXIT_INTERRUPTED = 130     # what a shell expects after Ctrl-C


class BadUrl(ValueError):
    """--url is not a WebSocket URL; the message says which one to use."""


def websocket_url(url: str) -> str:
    """The URL to dial: ws:// or wss://, with /ws when no path is given."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        scheme = "ws" if parts.scheme == "http" else "wss"
        raise BadUrl(f"--url wants a WebSocket URL: {scheme}://{parts.netloc or 'HOST:PORT'}/ws "
                     f"(the page is at {url}, its WebSocket at /ws)")
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise BadUrl(f"--url {url!r}: expected ws://HOST:PORT/ws (or wss:// with TLS)")
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/ws", "", ""))


def done_summary(done: dict[str, Any]) -> str:
    """"stop; first token after 812.0 ms, 24.1 tokens/s", leaving out what the answer has
    not got: a "not covered" answer is written without the LLM, so it has no tokens/s."""
    timings = done.get("timings", {})
    parts = [str(done.get("finish"))]
    if timings.get("ttft_ms") is not None:
        parts.append(f"first token after {timings['ttft_ms']} ms")
    if timings.get("tokens_per_s") is not None:
        parts.append(f"{timings['tokens_per_s']} tokens/s")
    return parts[0] + ("; " + ", ".join(parts[1:]) if parts[1:] else "")


class AnswerPrinter:
    """Human output: sources first, then the answer as it streams; the rest on stderr."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out = out
        self.err = err
        self.sources_open = False  # sources printed, the answer not begun
        self.see_also: dict[str, Any] | None = None
        self.session = ""  # from `welcome`: printed after the answer, for --session

    def __call__(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "source":
            where = f", {message['where']}" if message.get("where") else ""
            relevance = f", {message['relevance']} match" if message.get("relevance") else ""
            self.out.write(f"[{message['n']}] {message['title']}{where}"
                           f" ({message['doc']}{relevance})\n")
            self.sources_open = True
        elif kind == "queued" and message.get("position"):
            wait = f", about {message['wait_s']:.0f} s" if message.get("wait_s") else ""
            self.err.write(f"(queued: {message['position']} ahead{wait})\n")
        elif kind == "delta":
            if self.sources_open:
                self.out.write("\n")
                self.sources_open = False
            self.out.write(message["text"])
        elif kind == "hint" and message.get("kind") == "see_also" and message.get("sources"):
            self.see_also = message["sources"][0]
        elif kind == "done":
            self.out.write("\n")
            self.err.write(f"-- {done_summary(message)}\n")
            if self.see_also:
                where = f", {self.see_also['where']}" if self.see_also.get("where") else ""
                self.err.write(f"-- see also: {self.see_also.get('title')}{where}\n")
        elif kind == "error":
            self.err.write(f"error [{message.get('code')}]: {message.get('message')}\n")
        elif kind == "reconnecting":
            self.err.write(f"\n(link lost: {message['reason']}; reconnecting)\n")
        elif kind == "notice":
            self.err.write(f"({message.get('message')})\n")
        elif kind == "stopping":
            self.err.write("\n(stopping the answer; Ctrl-C again quits at once)\n")
        elif kind == "welcome":
            self.session = message["session"]
        if kind in ("done", "error") and message.get("id") and self.session:
            # --session=ID: an id may start with "-", which argparse would take for an option.
            self.err.write(f"-- session {self.session} (continue the conversation with "
                           f"--session={self.session})\n")
        self.out.flush()
        self.err.flush()


def json_printer(out: TextIO) -> Emit:
    def emit(message: dict[str, Any]) -> None:
        out.write(json.dumps(message, ensure_ascii=False) + "\n")
        out.flush()
    return emit


class Asker:
    """One question, asked and followed to its end across dropped links."""

    def __init__(self, url: str, question: str, emit: Emit, *, session: str | None = None,
                 kbs: list[str] | None = None, token: str | None = None,
                 cafile: str | None = None, timeout_s: float = 900.0,
                 max_reconnects: int = 30) -> None:
        self.url = websocket_url(url)
        # The token goes in the Authorization header (never the URL, which logs keep).
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.tls = ssl.create_default_context(cafile=cafile) if cafile else None
        self.question = question
        self.emit = emit
        self.session = session
        self.kbs = kbs or None
        self.timeout_s = timeout_s
        self.max_reconnects = max_reconnects
        self.request_id = "q-" + secrets.token_hex(4)
        self.last_seq = 0
        self.asked = False
        self.welcomed = False
        self.stopping = False          # Ctrl-C: cancel, then print how it ended
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._cancel_sent_on: aiohttp.ClientWebSocketResponse | None = None
        self._quit = asyncio.Event()   # Ctrl-C before the question was asked: nothing to wait

    def interrupt(self) -> bool:
        """Ctrl-C: True the first time (the answer is being stopped), False after."""
        if self.stopping:
            return False
        self.stopping = True
        self.emit({"type": "stopping"})
        if not self.asked:
            self._quit.set()
        elif self._ws is not None and not self._ws.closed:
            asyncio.ensure_future(self._send_cancel(self._ws))
        return True

    async def run(self) -> int:
        """0: answered; 1: an error, or no server; 130: stopped with Ctrl-C."""
        quit_wait = asyncio.ensure_future(self._quit.wait())
        attempt = asyncio.ensure_future(self._run())
        try:
            done, _ = await asyncio.wait([attempt, quit_wait],
                                         return_when=asyncio.FIRST_COMPLETED)
            return attempt.result() if attempt in done else EXIT_INTERRUPTED
        finally:
            for task in (attempt, quit_wait):
                task.cancel()
            await asyncio.gather(attempt, quit_wait, return_exceptions=True)

    async def _run(self) -> int:
        deadline = time.monotonic() + self.timeout_s
        reached = False
        timeout = aiohttp.ClientWSTimeout(ws_close=5)
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(connect=CONNECT_TIMEOUT_S)) as http:
            for attempt in range(self.max_reconnects + 1):
                target = f"{self.url}?{urlencode({'session': self.session})}" \
                    if self.session else self.url
                try:
                    async with http.ws_connect(target, protocols=(PROTOCOL,), heartbeat=30,
                                               headers=self.headers, ssl=self.tls,
                                               timeout=timeout) as ws:
                        reached = True
                        outcome = await self._converse(ws, deadline)
                        if outcome is not None:
                            return outcome
                except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError,
                        _Closed) as exc:
                    outcome = await self._dropped(exc, reached, attempt, deadline)
                    if outcome is not None:
                        return outcome
                finally:
                    self._ws = None
        return 1

    async def _dropped(self, exc: Exception, reached: bool, attempt: int,
                       deadline: float) -> int | None:
        """After a failed connect or a lost link: an exit status, or None to try again."""
        refused = isinstance(exc, aiohttp.WSServerHandshakeError) and \
            exc.status in (401, 403, 404)
        if refused or (not reached and attempt + 1 >= CONNECT_TRIES):
            return self._unreachable(exc, attempt)
        if not reached:
            await asyncio.sleep(0.3 * 2 ** attempt)
            return None
        if time.monotonic() >= deadline or attempt == self.max_reconnects:
            self.emit({"type": "error", "code": "gave_up", "message": f"link lost: {exc}"})
            return 1
        self.emit({"type": "reconnecting", "reason": str(exc) or type(exc).__name__,
                   "after": self.last_seq})
        await asyncio.sleep(min(MAX_BACKOFF_S, 0.25 * 2 ** attempt))
        return None

    def _unreachable(self, exc: Exception, attempt: int) -> int:
        if isinstance(exc, aiohttp.WSServerHandshakeError):
            if exc.status in (401, 403):
                reason = (f"it refused the connection ({exc.status}): pass --token or set "
                          "EDGEKB_TOKEN (a token from `edgekb token issue`)")
            elif exc.status == 404:
                reason = "no edgekb WebSocket there (HTTP 404): the path is /ws"
            else:
                reason = f"the WebSocket handshake failed (HTTP {exc.status})"
        else:
            reason = str(exc) or type(exc).__name__
        self.emit({"type": "error", "code": "unreachable", "message": (
            f"cannot reach {self.url} after {attempt + 1} tries: {reason}. Is `edgekb serve` "
            "running on that host and port? Check --url, or the server.host and server.port "
            "of the settings given with --config/--data-dir.")})
        return 1

    async def _converse(self, ws: aiohttp.ClientWebSocketResponse,
                        deadline: float) -> int | None:
        """Ask or resume on this connection; the exit status once the request ended, None
        when the link dropped first (raises)."""
        welcome = await _receive(ws, deadline)
        if welcome.get("type") != "welcome":
            raise _Closed(f"expected welcome, got {welcome.get('type')}")
        if not self.welcomed or welcome["session"] != self.session:
            if self.session not in (None, welcome["session"]) and not self.asked:
                self.emit({"type": "notice", "event": "new_session", "message":
                           f"no conversation {self.session} of yours here: this is a new one"})
            self.session = welcome["session"]
            self.welcomed = True
            self.emit(welcome)  # once, and again only if the server changed the session
        self._ws = ws
        await ws.send_str(encode(self._resume() if self.asked else self._ask()))
        self.asked = True
        if self.stopping and self._cancel_sent_on is not ws:
            await self._send_cancel(ws)
        while True:
            message = await _receive(ws, deadline)
            if message.get("id") != self.request_id:
                if message["type"] == "error" and message.get("code") == "unknown_request":
                    continue
                self.emit(message)  # notices and the like
                continue
            if message["type"] == "error" and "seq" not in message:
                if message.get("code") == "unknown_request":
                    # The link dropped before the server took the question: ask again.
                    await ws.send_str(encode(self._ask()))
                    continue
                if message.get("code") == "id_reuse":
                    await ws.send_str(encode(self._resume()))
                    continue
            if message.get("seq", 0) and message["seq"] <= self.last_seq:
                continue  # never print an event twice
            self.last_seq = message.get("seq", self.last_seq)
            self.emit(message)
            if message["type"] in ("done", "error"):
                if self.stopping:
                    return EXIT_INTERRUPTED
                return 0 if message["type"] == "done" and message["finish"] != "cancelled" else 1

    def _ask(self) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "ask", "id": self.request_id, "text": self.question}
        if self.kbs:
            message["kbs"] = self.kbs
        return message

    def _resume(self) -> dict[str, Any]:
        return {"type": "resume", "id": self.request_id, "after": self.last_seq}

    async def _send_cancel(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        if self._cancel_sent_on is ws:
            return
        self._cancel_sent_on = ws
        try:
            await ws.send_str(encode({"type": "cancel", "id": self.request_id}))
        except (ConnectionError, RuntimeError):
            self._cancel_sent_on = None  # sent again on the next connection


class _Closed(Exception):
    pass


async def _receive(ws: aiohttp.ClientWebSocketResponse, deadline: float) -> dict[str, Any]:
    msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
    if msg.type != aiohttp.WSMsgType.TEXT:
        raise _Closed(f"connection closed ({ws.close_code})")
    return json.loads(msg.data)
