"""A fault-injecting TCP proxy for tests: 127.0.0.1:0 -> a loopback server.

It can cut every current connection now or after N more server->client bytes, refuse new
connections (the server looks unreachable, as from a phone out of Wi-Fi range), add latency,
limit server->client bandwidth, and stall (stop forwarding without closing). Each direction of a
connection holds at most ``buffer_bytes``: beyond that the proxy stops reading from the source,
so a stalled or slow proxy pushes back on the sender like a real slow link. While stalled it
still notices when the server closes or resets its side (``Link.server_gone``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

STEP_S = 0.02  # pacing granularity for latency and bandwidth limits
TCP_ESTABLISHED = 1  # tcpi_state, linux/tcp.h


class _Side(asyncio.Protocol):
    """One socket of a link; what it receives goes to the pump toward the other socket."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.outgoing: _Pump | None = None  # where what this socket receives goes
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.link.proxy.refusing and self is self.link.client:
            transport.abort()  # the link is down: reset at once

    def data_received(self, data: bytes) -> None:
        assert self.outgoing is not None
        self.outgoing.feed(data)

    def eof_received(self) -> bool:
        self.closed.set()
        if self.outgoing is not None:
            self.outgoing.wake()
        return True  # keep our write side open until the pump has forwarded the rest

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        self._writable.set()
        if self.outgoing is not None:
            self.outgoing.wake()
        self.link.side_lost()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def writable(self) -> None:
        await self._writable.wait()


class _Pump:
    """Moves bytes from one side to the other, honouring stall, latency, rate and cut budget."""

    def __init__(self, proxy: FaultProxy, source: _Side, downstream: bool) -> None:
        self.proxy = proxy
        self.source = source
        self.target: _Side | None = None
        self.downstream = downstream  # server -> client
        self.chunks: deque[tuple[float, bytes]] = deque()
        self.size = 0
        self._wake = asyncio.Event()
        self._paused = False

    def feed(self, data: bytes) -> None:
        self.chunks.append((time.monotonic(), data))
        self.size += len(data)
        if self.size >= self.proxy.buffer_bytes and not self._paused:
            self._paused = True
            assert self.source.transport is not None
            self.source.transport.pause_reading()
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    def _take(self, limit: int) -> bytes:
        stamp, data = self.chunks.popleft()
        if len(data) > limit:
            self.chunks.appendleft((stamp, data[limit:]))
            data = data[:limit]
        self.size -= len(data)
        if self._paused and self.size < self.proxy.buffer_bytes // 2:
            self._paused = False
            if self.source.transport is not None and not self.source.transport.is_closing():
                self.source.transport.resume_reading()
        return data

    async def run(self) -> None:
        assert self.target is not None and self.target.transport is not None
        target = self.target.transport
        sent_at, credit = time.monotonic(), 0.0
        while True:
            if target.is_closing():
                return
            stalled = self.proxy.stalled_down if self.downstream else self.proxy.stalled_up
            if stalled or not self.chunks:
                if not self.chunks and self.source.closed.is_set() and not stalled:
                    target.close()  # the source closed: pass that on once all is sent
                    return
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), STEP_S)
                continue
            ready_at = self.chunks[0][0] + self.proxy.latency_s
            now = time.monotonic()
            if now < ready_at:
                await asyncio.sleep(min(ready_at - now, STEP_S))
                continue
            limit = 1 << 20
            rate = self.proxy.rate_bytes_per_s if self.downstream else None
            if rate is not None:
                credit = min(credit + (now - sent_at) * rate, rate * STEP_S * 2)
                sent_at = now
                if credit < 1:
                    await asyncio.sleep(STEP_S)
                    continue
                limit = int(credit)
            budget = self.proxy.cut_budget if self.downstream else None
            if budget is not None:
                limit = min(limit, max(budget, 1))
            data = self._take(limit)
            credit -= len(data)
            target.write(data)
            if budget is not None:
                self.proxy.spend(len(data))
            await self.target.writable()


@dataclass(eq=False)
class Link:
    """One client connection and its connection to the server."""

    proxy: FaultProxy
    client: _Side | None = None
    server: _Side | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def server_gone(self) -> bool:
        """Whether the server closed or reset its side. Read from the kernel's TCP state, so
        it shows even while the proxy is not reading (stalled with a full buffer)."""
        if self.server is None or self.server.closed.is_set():
            return self.server is not None
        sock = self.server.transport.get_extra_info("socket") if self.server.transport else None
        if sock is None:
            return True
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
        except OSError:
            return True
        return state != TCP_ESTABLISHED

    def held_for_client(self) -> bytes:
        """What the server sent that the proxy has not forwarded yet (stalled or slow)."""
        pump = self.server.outgoing if self.server is not None else None
        return b"".join(data for _, data in pump.chunks) if pump is not None else b""

    def side_lost(self) -> None:
        sides = [s for s in (self.client, self.server) if s is not None]
        if all(s.transport is None or s.transport.is_closing() for s in sides):
            self.proxy.links.discard(self)

    def cut(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.server is not None and self.server.transport is not None:
            self.server.transport.abort()
        client = self.client.transport if self.client is not None else None
        if client is not None:
            # What was already written reaches the client, then the connection ends.
            if client.get_write_buffer_size():
                client.abort()
            else:
                client.close()


class FaultProxy:
    def __init__(self, target_port: int, *, buffer_bytes: int = 64 * 1024) -> None:
        self.target_port = target_port
        self.buffer_bytes = buffer_bytes
        self.latency_s = 0.0
        self.rate_bytes_per_s: float | None = None
        self.stalled_down = False  # server -> client
        self.stalled_up = False    # client -> server
        self.cut_budget: int | None = None
        self.cuts = 0  # how many times connections were cut
        self.refusing = False  # new connections are reset at once
        self.links: set[Link] = set()
        self.accepted: list[Link] = []  # every link ever made, for tests to inspect
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def ws_url(self, session: str | None = None) -> str:
        return f"ws://127.0.0.1:{self.port}/ws" + (f"?session={session}" if session else "")

    async def start(self) -> FaultProxy:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, "127.0.0.1", 0)
        return self

    def _accept(self) -> _Side:
        link = Link(self)
        link.client = _Side(link)
        # What the client sends before the server connection exists waits in this pump.
        link.client.outgoing = _Pump(self, link.client, downstream=False)
        self._spawn(self._connect(link))
        return link.client

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _connect(self, link: Link) -> None:
        assert link.client is not None and link.client.outgoing is not None
        if self.refusing:
            return  # the client side was reset as it connected
        loop = asyncio.get_running_loop()
        try:
            _, server_side = await asyncio.wait_for(loop.create_connection(
                lambda: _Side(link), "127.0.0.1", self.target_port), 10)
        except (OSError, asyncio.TimeoutError):
            if link.client.transport is not None:
                link.client.transport.abort()
            return
        link.server = server_side
        upstream = link.client.outgoing
        downstream = _Pump(self, server_side, downstream=True)
        server_side.outgoing = downstream
        upstream.target, downstream.target = server_side, link.client
        self.links.add(link)
        self.accepted.append(link)
        link.tasks = [self._spawn(upstream.run()), self._spawn(downstream.run())]

    def spend(self, sent: int) -> None:
        if self.cut_budget is None:
            return
        self.cut_budget -= sent
        if self.cut_budget <= 0:
            self.cut_budget = None
            self.cut()

    def cut_after(self, server_bytes: int | None) -> None:
        """Cut every connection once this many more server->client bytes went through
        (None: disarm). The client gets exactly those bytes, then the connection drops."""
        self.cut_budget = server_bytes

    def cut(self) -> int:
        """Drop every current connection at once; returns how many there were."""
        links = list(self.links)
        for link in links:
            link.cut()
        self.links.clear()
        if links:
            self.cuts += 1
        return len(links)

    def go_down(self) -> None:
        """The link is gone: every connection dropped, new ones refused until ``come_back``."""
        self.refusing = True
        self.cut()

    def come_back(self) -> None:
        self.refusing = False

    def stall(self, client_to_server: bool = True) -> None:
        """Stop forwarding server->client (and client->server unless told not to); the
        connections stay open, like a link that went silent."""
        self.stalled_down = True
        self.stalled_up = client_to_server

    def flow(self) -> None:
        self.stalled_down = self.stalled_up = False
        for link in self.links:
            for side in (link.client, link.server):
                if side is not None and side.outgoing is not None:
                    side.outgoing.wake()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for link in self.accepted:
            for side in (link.client, link.server):
                if side is not None and side.transport is not None:
                    side.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
