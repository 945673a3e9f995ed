"""Dead-peer detection that a slow link does not fool.

A protocol ping queued behind outbound data reaches a 256 kbit/s client late, and a plain
ping/pong timeout then closes a healthy connection. Here any inbound frame counts as life, a ping
goes out only after a quiet interval, and while we have data in flight the TCP ACKs the peer's
kernel sends (TCP_INFO's last_ack_recv) count as life too: the link is slow, not dead. A peer is
declared dead after interval + timeout with neither frames nor ACKs.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Awaitable, Callable

# struct tcp_info (linux/tcp.h): tcpi_unacked at byte 24, tcpi_last_ack_recv (ms) at byte 56.
_TCP_INFO_LEN = 104
_UNACKED_OFFSET = 24
_LAST_ACK_RECV_OFFSET = 56


def tcp_ack_age_s(sock: socket.socket | None) -> float | None:
    """Seconds since the peer last ACKed data we sent, when data is in flight; else None."""
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(info) < _LAST_ACK_RECV_OFFSET + 4:
        return None
    (unacked,) = struct.unpack_from("I", info, _UNACKED_OFFSET)
    (last_ack_ms,) = struct.unpack_from("I", info, _LAST_ACK_RECV_OFFSET)
    return last_ack_ms / 1000 if unacked else None


class Heartbeat:
    def __init__(self, interval_s: float, timeout_s: float, ping: Callable[[], Awaitable[None]],
                 sock: socket.socket | None) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._ping = ping
        self._sock = sock
        self.last_inbound = time.monotonic()

    def saw_inbound(self) -> None:
        self.last_inbound = time.monotonic()

    def _acks_flowing(self) -> bool:
        age = tcp_ack_age_s(self._sock)
        return age is not None and age < self.timeout_s

    async def run(self) -> None:
        """Returns when the peer is dead; the caller closes the connection."""
        pinged_at: float | None = None
        step = max(0.05, min(self.interval_s, self.timeout_s) / 4)
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            quiet = now - self.last_inbound
            if self._acks_flowing():
                continue  # data in flight is being acknowledged: alive, no ping needed
            if quiet < self.interval_s:
                pinged_at = None
                continue
            if pinged_at is None or pinged_at < self.last_inbound:
                pinged_at = now
                await self._ping()
            elif now - pinged_at >= self.timeout_s:
                return
