"""systemd's notify protocol, without a dependency: READY=1, STATUS=, STOPPING=1, WATCHDOG=1.

A message is one datagram to the Unix socket named by $NOTIFY_SOCKET (a leading "@" names an
abstract socket), as gunicorn's gunicorn/systemd.py does. Outside systemd the variable is unset
and every call does nothing. The socket is non-blocking: a full receive queue drops a message
rather than stall the event loop.

The watchdog keep-alives are scheduled on the event loop itself (``loop.call_later``), never
from a thread: a loop that is stuck stops them, and systemd restarts the service. A thread
would go on pinging for a server that no longer answers anybody.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends state lines to systemd; a no-op when not started by systemd with Type=notify."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        if address:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                sock.connect("\0" + address[1:] if address.startswith("@") else address)
            except OSError as exc:
                log.warning("cannot reach systemd's notify socket %s: %s", address, exc)
                sock.close()
            else:
                self._sock = sock

    @classmethod
    def from_env(cls, env: MutableMapping[str, str] = os.environ) -> Notifier:
        # Taken out of the environment so that no child process can speak for us.
        return cls(env.pop("NOTIFY_SOCKET", None))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> bool:
        """One datagram of ``KEY=VALUE`` lines; False when it could not be sent."""
        if self._sock is None:
            return False
        try:
            self._sock.send("\n".join(lines).encode())
        except OSError as exc:  # BlockingIOError included: never wait for systemd
            log.warning("notify %r not sent: %s", lines[0].split("=")[0], exc)
            return False
        return True

    def status(self, text: str) -> None:
        log.info("%s", text)
        self.send(f"STATUS={_one_line(text)}")

    def ready(self, text: str) -> None:
        self.send("READY=1", f"STATUS={_one_line(text)}", f"MAINPID={os.getpid()}")

    def stopping(self, text: str) -> None:
        self.send("STOPPING=1", f"STATUS={_one_line(text)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def watchdog_interval_s(env: MutableMapping[str, str] = os.environ) -> float | None:
    """Seconds between keep-alives (half of WatchdogSec, as sd_watchdog_enabled advises), or
    None when systemd asked for none, or asked another process (WATCHDOG_PID)."""
    usec = env.pop("WATCHDOG_USEC", None)
    pid = env.pop("WATCHDOG_PID", None)
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", usec)
        return None
    return value / 2e6 if value > 0 else None


class Watchdog:
    """WATCHDOG=1 every ``interval_s``, from the event loop that must stay responsive."""

    def __init__(self, notifier: Notifier, interval_s: float | None) -> None:
        self.notifier = notifier
        self.interval_s = interval_s
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self.interval_s is None or not self.notifier.enabled:
            return
        log.info("watchdog keep-alive every %.1f s", self.interval_s)
        self._tick()

    def _tick(self) -> None:
        self.notifier.send("WATCHDOG=1")
        self._handle = asyncio.get_running_loop().call_later(self.interval_s, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
