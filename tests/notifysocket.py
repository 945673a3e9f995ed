"""systemd's side of the notify protocol for tests: a real Unix datagram socket that records
each message with the kernel's arrival time (SO_TIMESTAMP), so gaps between keep-alives are
measured where they arrive, whatever the test process was doing meanwhile."""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

# Linux's SO_TIMESTAMP (asm-generic; x86 and arm alike); Python does not name it. The kernel
# then hands each datagram's arrival time as a struct timeval (two C longs).
SO_TIMESTAMP = getattr(socket, "SO_TIMESTAMP", 29)
_TIMEVAL = struct.Struct("ll")


@dataclass(frozen=True)
class Message:
    at: float                 # arrival, Unix time from the kernel
    fields: dict[str, str]

    def __contains__(self, key: str) -> bool:
        return key in self.fields


class NotifySocket:
    """Bound to a path, or to an abstract name when ``abstract`` (NOTIFY_SOCKET="@name")."""

    def __init__(self, path: Path | None = None, abstract: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
        if abstract is not None:
            self.sock.bind("\0" + abstract)
            self.address = "@" + abstract
        else:
            assert path is not None
            self.sock.bind(str(path))
            self.address = str(path)
        self.messages: list[Message] = []

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address, **extra}

    def drain(self, wait_s: float = 0.0) -> list[Message]:
        """Read what has arrived (waiting up to ``wait_s`` for the first one)."""
        deadline = time.monotonic() + wait_s
        while True:
            ready, _, _ = select.select([self.sock], [], [],
                                        max(0.0, deadline - time.monotonic()))
            if not ready:
                return self.messages
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_TIMEVAL.size))
            at = time.time()
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMP:
                    seconds, micros = _TIMEVAL.unpack(payload[:_TIMEVAL.size])
                    at = seconds + micros / 1e6
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(Message(at, fields))
            deadline = time.monotonic()  # then take only what is queued already

    def wait_for(self, key: str, timeout_s: float) -> Message:
        """The first message carrying ``key`` (bounded in time)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for message in self.drain(min(0.5, max(0.0, deadline - time.monotonic()))):
                if key in message:
                    return message
        raise AssertionError(f"no {key} within {timeout_s} s; got "
                             f"{[m.fields for m in self.messages]}")

    def keepalives(self) -> list[float]:
        return [m.at for m in self.drain() if m.fields.get("WATCHDOG") == "1"]

    def close(self) -> None:
        name = self.sock.getsockname()
        self.sock.close()
        if isinstance(name, str) and name and os.path.exists(name):
            os.unlink(name)
