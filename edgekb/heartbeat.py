"""Dead-peer detection that a slow link does not fool.

A protocol ping queued behind outbound data reaches a 256 kbit/s client late, and a plain
ping/pong timeout then closes a healthy connection. Here any inbound frame counts as life; a ping
goes out only after a quiet interval; and when its pong is late, the peer's TCP stack gets the
last word: if it acknowledged any of our bytes since the ping (TCP_INFO's last_ack_recv), the
link is slow or the client busy, not dead. A peer is declared dead when the pong timeout passes
with neither a frame nor a TCP acknowledgement: within interval + timeout of its last sign.

Acknowledgements alone keep a peer for at most MAX_SILENT_S: behind a proxy that ends TCP (nginx,
a Wi-Fi gateway) they come from the proxy, which acknowledges for a client long gone.
"""

from __future__ import annotations

import socket
import struct
import time

# struct tcp_info (linux/tcp.h): tcpi_unacked at byte 24, tcpi_last_ack_recv (ms) at byte 56.
_TCP_INFO_LEN = 104
_UNACKED_OFFSET = 24
_LAST_ACK_RECV_OFFSET = 56
# Longest a peer may stay without sending a frame (pong, ping, anything) while TCP acknowledges:
# long enough to drain a full send queue over a 256 kbit/s link.
MAX_SILENT_S = 120.0


def tcp_acked_within(sock: socket.socket | None, seconds: float) -> bool | None:
    """Whether the peer's TCP acknowledged our data in the last ``seconds`` (all data acked
    counts too); None where TCP_INFO cannot tell (another OS, no socket)."""
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
    return unacked == 0 or last_ack_ms / 1000 < seconds


class Heartbeat:
    """One connection's liveness, checked by the server's single sweeper (no task per
    connection: a thousand idle connections cost a thousand timers otherwise)."""

    def __init__(self, interval_s: float, timeout_s: float, sock: socket.socket | None,
                 max_silent_s: float = MAX_SILENT_S) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._sock = sock
        self.last_inbound = time.monotonic()
        self.last_frame = self.last_inbound
        self.max_silent_s = max(max_silent_s, 2 * (interval_s + timeout_s))
        self._pinged_at: float | None = None

    def saw_inbound(self) -> None:
        self.last_inbound = self.last_frame = time.monotonic()

    def check(self, now: float) -> str:
        """``ok``, ``ping`` (send one now) or ``dead`` (close the connection)."""
        if now - self.last_inbound < self.interval_s:
            self._pinged_at = None
            return "ok"
        if self._pinged_at is None:
            self._pinged_at = now
            return "ping"
        since_ping = now - self._pinged_at
        if since_ping < self.timeout_s:
            return "ok"
        if now - self.last_frame < self.max_silent_s and \
                tcp_acked_within(self._sock, since_ping):
            self.last_inbound = now  # the link carries our bytes: slow, not dead
            self._pinged_at = None
            return "ok"
        return "dead"


def sweep_step(interval_s: float, timeout_s: float) -> float:
    """How often the sweeper looks at every connection."""
    return max(0.05, min(interval_s, timeout_s) / 4)
