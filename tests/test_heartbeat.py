"""Dead-peer detection on real loopback TCP sockets (the server-level tests use the proxy).

The server's sweeper calls Heartbeat.check every sweep step; here a bounded loop plays it."""

from __future__ import annotations

import asyncio
import socket
import time

from edgekb.heartbeat import Heartbeat, sweep_step


def _connected_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return server, client


async def _sweep(heartbeat: Heartbeat, seconds: float, on_ping) -> float | None:  # type: ignore[no-untyped-def]
    """Check like the sweeper for at most ``seconds``; when declared dead, how long it took."""
    step = sweep_step(heartbeat.interval_s, heartbeat.timeout_s)
    started = time.monotonic()
    for _ in range(int(seconds / step) + 1):
        await asyncio.sleep(step)
        state = heartbeat.check(time.monotonic())
        if state == "ping":
            on_ping()
        elif state == "dead":
            return time.monotonic() - started
    return None


async def test_a_peer_whose_tcp_acknowledges_but_never_answers_is_dead_after_max_silent() -> None:
    """The peer's kernel acknowledges every ping (as a TCP-terminating proxy would for a client
    long gone) but no frame ever comes back: acknowledgements keep it only for max_silent_s."""
    server, client = _connected_pair()
    pings = 0

    def ping() -> None:
        nonlocal pings
        pings += 1
        server.send(b"\x89\x00")  # a ping frame; the peer's kernel acknowledges it

    try:
        took = await _sweep(Heartbeat(0.2, 0.2, server, max_silent_s=2.0), 10, ping)
    finally:
        server.close()
        client.close()
    assert pings >= 3, "acknowledged pings kept the peer for a while"
    assert took is not None and 2.0 <= took < 3.5, \
        f"declared dead after {took} s, not max_silent_s + timeout"


async def test_a_peer_that_answers_is_kept() -> None:
    server, client = _connected_pair()
    heartbeat = Heartbeat(0.2, 0.2, server, max_silent_s=1.0)
    try:
        took = await _sweep(heartbeat, 3, heartbeat.saw_inbound)  # the pong, as the reader sees it
    finally:
        server.close()
        client.close()
    assert took is None, "a peer that answers every ping was declared dead"
