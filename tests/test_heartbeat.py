"""Dead-peer detection on real loopback TCP sockets (the server-level tests use the proxy)."""

from __future__ import annotations

import asyncio
import socket
import time

from edgekb.heartbeat import Heartbeat


async def _pinged_connection() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return server, client


async def test_a_peer_whose_tcp_acknowledges_but_never_answers_is_dead_after_max_silent() -> None:
    """The peer's kernel acknowledges every ping (as a TCP-terminating proxy would for a client
    long gone) but no frame ever comes back: acknowledgements keep it only for max_silent_s."""
    server, client = await _pinged_connection()
    pings = 0

    async def ping() -> None:
        nonlocal pings
        pings += 1
        server.send(b"\x89\x00")  # a ping frame; the peer's kernel acknowledges it

    try:
        heartbeat = Heartbeat(0.2, 0.2, ping, server, max_silent_s=2.0)
        started = time.monotonic()
        await asyncio.wait_for(heartbeat.run(), 10)
        took = time.monotonic() - started
    finally:
        server.close()
        client.close()
    assert pings >= 3, "acknowledged pings kept the peer for a while"
    assert 2.0 <= took < 3.5, f"declared dead after {took:.1f} s, not max_silent_s + timeout"


async def test_a_peer_that_answers_is_kept() -> None:
    server, client = await _pinged_connection()
    heartbeat: Heartbeat

    async def ping() -> None:
        heartbeat.saw_inbound()  # the pong, as the reader would see it

    try:
        heartbeat = Heartbeat(0.2, 0.2, ping, server, max_silent_s=1.0)
        runner = asyncio.create_task(heartbeat.run())
        await asyncio.sleep(3)
        assert not runner.done(), "a peer that answers every ping was declared dead"
        runner.cancel()
    finally:
        server.close()
        client.close()
