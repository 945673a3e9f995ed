"""How much one client may take: question rates, login attempts, connections, file descriptors.

Transport-free counters with bounded memory (a flood of new addresses or names evicts the
oldest entries, never grows without end). Each refusal is a typed error with ``retry_after``;
callers audit it. The question limiter is called by the conversation core, so every transport
shares one budget per user.
"""

from __future__ import annotations

import ipaddress
import math
import os
import resource
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from .errors import EdgekbError

MAX_TRACKED = 10_000  # users or addresses remembered per limiter
# File descriptors kept out of the connection budget: SQLite (database, WAL, shared memory per
# connection), models, the index, uploads being written, the audit log, pipes of threads.
FD_RESERVE = 96
LOGIN_MAX_DELAY_S = 300.0
LOGIN_FORGET_S = 900.0  # failures older than this are forgotten

Clock = Callable[[], float]


class RateLimited(EdgekbError):
    code = "rate_limited"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after=round(max(retry_after, 0.1), 1))
        self.retry_after = max(retry_after, 0.1)


class TooManyConnections(RateLimited):
    code = "too_many_connections"


class ServerFull(EdgekbError):
    code = "server_full"

    def __init__(self, message: str, retry_after: float = 5.0) -> None:
        super().__init__(message, retry_after=retry_after)
        self.retry_after = retry_after


class _Bounded(OrderedDict):  # type: ignore[type-arg]
    """An LRU map: touching a key keeps it; past MAX_TRACKED the oldest goes."""

    def touch(self, key: str, value: object) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > MAX_TRACKED:
            self.popitem(last=False)


class QuestionRate:
    """Questions per user per minute: a token bucket of ``per_minute`` that refills evenly, so
    a user may ask a burst and then one question every 60/per_minute seconds."""

    def __init__(self, per_minute: int, clock: Clock = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.refill_per_s = per_minute / 60.0
        self.clock = clock
        self._buckets = _Bounded()  # user -> (tokens, at)

    def take(self, user: str) -> None:
        now = self.clock()
        tokens, at = self._buckets.get(user, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.refill_per_s)
        if tokens < 1.0:
            self._buckets.touch(user, (tokens, now))
            raise RateLimited(f"more than {self.capacity:.0f} questions a minute",
                              (1.0 - tokens) / self.refill_per_s)
        self._buckets.touch(user, (tokens - 1.0, now))


class LoginThrottle:
    """After ``free`` failed logins from one address, each further try waits twice as long as
    the one before (1 s, 2 s, 4 s ... at most 5 minutes); a success forgets the failures."""

    def __init__(self, free: int, clock: Clock = time.monotonic) -> None:
        self.free = free
        self.clock = clock
        self._failures = _Bounded()  # address -> (count, last failure)

    def check(self, address: str) -> None:
        count, last = self._state(address)
        if count < self.free:
            return
        wait = min(LOGIN_MAX_DELAY_S, 2.0 ** (count - self.free))
        left = last + wait - self.clock()
        if left > 0:
            raise RateLimited(f"{count} failed logins from {address}; wait before trying again",
                              left)

    def failed(self, address: str) -> None:
        count, _ = self._state(address)
        self._failures.touch(address, (count + 1, self.clock()))

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)

    def _state(self, address: str) -> tuple[int, float]:
        count, last = self._failures.get(address, (0, 0.0))
        if count and self.clock() - last > LOGIN_FORGET_S:
            self._failures.pop(address, None)
            return 0, 0.0
        return count, last


class ConnectionCounter:
    """Open connections per address and in total; ``acquire`` refuses past either cap."""

    def __init__(self, per_address: int, total: int) -> None:
        self.per_address = per_address
        self.total = total
        self.open = 0
        self._by_address: dict[str, int] = {}

    def acquire(self, address: str, counted: bool = True) -> None:
        """Count one more connection; ``counted=False`` (a trusted proxy carrying many
        clients) applies only the total."""
        if self.open >= self.total:
            raise ServerFull(f"the appliance has {self.open} connections open, its limit")
        mine = self._by_address.get(address, 0)
        if counted and mine >= self.per_address:
            raise TooManyConnections(f"{mine} connections from {address} already open",
                                     retry_after=5.0)
        self.open += 1
        self._by_address[address] = mine + 1

    def release(self, address: str) -> None:
        self.open -= 1
        left = self._by_address.get(address, 1) - 1
        if left > 0:
            self._by_address[address] = left
        else:
            self._by_address.pop(address, None)


def raise_fd_limit() -> int:
    """Raise the soft file-descriptor limit to the hard one; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # a container may refuse; the limit read below is what counts
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def connection_ceiling(configured: int, fd_limit: int, in_use: int) -> int:
    """The total connection cap: the configured one, kept below what the descriptors allow,
    so a flood is refused by us (a typed 503) before accept() fails with EMFILE."""
    room = fd_limit - in_use - FD_RESERVE
    return max(1, min(configured, room))


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(items: list[str]) -> list[Network]:
    networks: list[Network] = []
    for item in items:
        networks.append(ipaddress.ip_network(item, strict=False))
    return networks


def _in(address: str, networks: list[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_address(peer: str, headers: Mapping[str, str], trusted: list[Network]) -> str:
    """The socket's peer, or, when the peer is a trusted proxy, the nearest X-Forwarded-For
    entry that is not itself a trusted proxy (entries further left are client-controlled)."""
    if not trusted or not _in(peer, trusted):
        return peer
    hops = [h.strip() for h in headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _in(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # a malformed entry: trust nothing further
    return peer


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
