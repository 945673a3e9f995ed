"""Every TCP connection passes here before aiohttp sees it: caps, TLS, slow clients.

aiohttp's server has no connection caps and no header or body deadlines (its keep-alive timer
is the only one). This module wraps each connection's protocol:

- Caps: connections per address and in total, the total kept below the file-descriptor limit,
  so a flood is answered by us (a typed 429/503, or a plain close on a TLS port, where answering
  would cost a handshake per refused socket) instead of accept() failing with EMFILE and the
  appliance going dark, /healthz included. A trusted proxy's connections count only toward the
  total (the middleware caps its clients by their forwarded address).
- TLS: the handshake runs after the connection is counted (start_tls), so sockets stalled in a
  handshake are capped like the rest and time out with it.
- Slow clients: a request's headers must be complete within header_timeout_s (a 408, typed, then
  the close), and a body must keep a minimum rate after a grace time, counted only while we are
  reading (a body we paused because our disk is slow is not the client's fault).
The access middleware tells the guard when a request's handler starts and ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .audit import AuditLog
from .errors import EdgekbError
from .limits import ConnectionCounter, Network, RateLimited, ServerFull, _in, retry_after_header

log = logging.getLogger(__name__)

BODY_CHECK_S = 1.0
LISTEN_BACKLOG = 128
EARLY_BYTES_MAX = 256 * 1024


class SlowClient(EdgekbError):
    code = "too_slow"


def raw_error(status: int, reason: str, error: EdgekbError) -> bytes:
    """A whole HTTP/1.1 error response, for refusals made before aiohttp has a request."""
    body = json.dumps({"error": error.to_wire()}).encode()
    retry = error.details.get("retry_after")
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close"]
    if retry is not None:
        head.append(f"Retry-After: {retry_after_header(retry)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class ConnectionGuard:
    """What every guarded connection shares: the counter, the deadlines, TLS, the audit log."""

    def __init__(self, counter: ConnectionCounter, trusted: list[Network], audit: AuditLog,
                 *, header_timeout_s: float, body_timeout_s: float, body_min_bytes_s: int,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.counter = counter
        self.trusted = trusted
        self.audit = audit
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.body_min_bytes_s = body_min_bytes_s
        self.ssl_context = ssl_context

    def factory(self, make_handler: Callable[[], asyncio.Protocol]) -> Callable[[], Any]:
        return lambda: GuardedProtocol(self, make_handler)


class GuardedProtocol(asyncio.Protocol):
    def __init__(self, guard: ConnectionGuard, make_handler: Callable[[], asyncio.Protocol]):
        self.guard = guard
        self.make_handler = make_handler
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.counted = False
        self.in_request = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_watch: asyncio.Task[None] | None = None
        self._tls: asyncio.Task[None] | None = None
        # Bytes asyncio hands us between the end of the TLS handshake and _attach: the
        # client's first request often shares a segment with its Finished message.
        self._early: list[bytes] = []
        self._early_bytes = 0
        self._early_eof = False

    # --- asyncio protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else "local"
        try:
            self.guard.counter.acquire(self.peer, counted=not _in(self.peer, self.guard.trusted))
        except (RateLimited, ServerFull) as exc:
            self._refuse(transport, exc)  # type: ignore[arg-type]
            return
        self.counted = True
        loop = asyncio.get_running_loop()
        self._header_timer = loop.call_later(self.guard.header_timeout_s, self._headers_late)
        if self.guard.ssl_context is not None:
            transport.pause_reading()  # type: ignore[attr-defined]
            self._tls = asyncio.create_task(self._start_tls(transport))  # type: ignore[arg-type]
        else:
            self._attach(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            if self._tls is not None:
                self._keep_early(data)
            return
        if not self.in_request and self._header_timer is None:  # a next request begins
            self._header_timer = asyncio.get_running_loop().call_later(
                self.guard.header_timeout_s, self._headers_late)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.inner is None:
            self._early_eof = True
            return None
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        self._stop_timers()
        if self._tls is not None:
            self._tls.cancel()
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    # --- called by the access middleware --------------------------------------------------

    def request_started(self, request: web.Request) -> None:
        self.in_request = True
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if request.body_exists and not request.content.is_eof() and \
                self.guard.body_min_bytes_s > 0:
            self._body_watch = asyncio.create_task(self._watch_body(request))

    def request_finished(self) -> None:
        """Back to waiting for the next request: aiohttp's keep-alive timer closes an idle
        connection; the next request's headers get header_timeout_s from its first byte."""
        self.in_request = False
        if self._body_watch is not None:
            self._body_watch.cancel()
            self._body_watch = None

    # --- inside -----------------------------------------------------------------------------

    def _attach(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.inner = self.make_handler()
        self.inner.connection_made(transport)
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)
        if self._early_eof and not transport.is_closing():
            self.inner.eof_received()

    def _keep_early(self, data: bytes) -> None:
        """Hold what arrives before the handshake's end reaches _attach, bounded: more than a
        request head's worth before we could even read it is not a client we serve."""
        self._early.append(data)
        self._early_bytes += len(data)
        if self._early_bytes > EARLY_BYTES_MAX and self.transport is not None:
            self._early = []
            self.transport.abort()

    async def _start_tls(self, raw: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        assert self.guard.ssl_context is not None
        secure = None
        try:
            secure = await loop.start_tls(raw, self, self.guard.ssl_context, server_side=True,
                                          ssl_handshake_timeout=self.guard.header_timeout_s)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            log.debug("TLS handshake with %s failed: %s", self.peer, exc)
            raw.abort()
        finally:
            if secure is None:  # asyncio tells the protocol nothing of a failed handshake
                self._release()
                self._stop_timers()
        if secure is not None:
            self._attach(secure)

    def _release(self) -> None:
        if self.counted:
            self.counted = False
            self.guard.counter.release(self.peer)

    def _refuse(self, transport: asyncio.Transport, exc: EdgekbError) -> None:
        status, reason = (503, "Service Unavailable") if isinstance(exc, ServerFull) \
            else (429, "Too Many Requests")
        self.guard.audit.record("connection_refused", address=self.peer, outcome=exc.code,
                                coalesce=f"refused:{self.peer}")
        if self.guard.ssl_context is None:
            transport.write(raw_error(status, reason, exc))
            transport.close()
        else:
            transport.abort()

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.in_request or self.transport is None:
            return
        self.guard.audit.record("slow_client", address=self.peer, outcome="too_slow",
                                phase="headers", coalesce=f"slow:{self.peer}")
        error = SlowClient(f"the request headers did not arrive within "
                           f"{self.guard.header_timeout_s:g} s")
        if self.inner is not None:  # after a TLS handshake, or plain
            self.transport.write(raw_error(408, "Request Timeout", error))
        self.transport.close()

    async def _watch_body(self, request: web.Request) -> None:
        """Cut off a body that arrives slower than body_min_bytes_s after the grace time."""
        content = request.content
        reading_s = 0.0
        while not content.is_eof():
            await asyncio.sleep(BODY_CHECK_S)
            if self.transport is None or not self.transport.is_reading():
                continue  # paused by us: the time is not the client's
            reading_s += BODY_CHECK_S
            allowed = self.guard.body_timeout_s + content.total_bytes / \
                self.guard.body_min_bytes_s
            if reading_s > allowed:
                self.guard.audit.record("slow_client", address=self.peer, outcome="too_slow",
                                        phase="body", bytes=content.total_bytes,
                                        coalesce=f"slow:{self.peer}")
                content.set_exception(SlowClient(
                    f"the request body arrived slower than {self.guard.body_min_bytes_s} "
                    "bytes/s"))
                return

    def _stop_timers(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._body_watch is not None:
            self._body_watch.cancel()
            self._body_watch = None


class GuardedSite(web.BaseSite):
    """A TCP site whose connections all pass through a ConnectionGuard."""

    __slots__ = ("_bound", "_guard", "_host", "_port", "_sock")

    def __init__(self, runner: web.BaseRunner, host: str, port: int,
                 guard: ConnectionGuard, sock: socket.socket | None = None) -> None:
        super().__init__(runner, backlog=LISTEN_BACKLOG)
        self._host, self._port, self._guard, self._sock = host, port, guard, sock
        self._bound: tuple[str, int] | None = None

    @property
    def name(self) -> str:
        scheme = "https" if self._guard.ssl_context else "http"
        host, port = self._bound or (self._host, self._port)
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    @property
    def port(self) -> int:
        return self._bound[1] if self._bound else self._port

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        # TLS is not given to create_server: the guard starts it once the connection counts.
        if self._sock is not None:  # systemd's socket (socket activation), already bound
            self._server = await loop.create_server(self._guard.factory(server),
                                                    sock=self._sock, backlog=self._backlog)
        else:
            self._server = await loop.create_server(self._guard.factory(server), self._host,
                                                    self._port, backlog=self._backlog)
        sockets = self._server.sockets
        if sockets:
            name = sockets[0].getsockname()
            self._bound = (str(name[0]), int(name[1]))
