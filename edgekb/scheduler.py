"""A fair, bounded queue in front of the one LLM slot.

Users are served round-robin, so one user with many questions cannot starve the others; within
a user, first come first served. Every waiter is told its position (how many answers will run
before its own; 0 = it runs now) at once and whenever it changes. A full
queue (in total, or for one user) refuses at once with a typed ``busy`` error and a retry-after
estimated from recent service times, never a silent wait.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from .errors import Busy

PositionCallback = Callable[[int], None]
MAX_REMEMBERED_USERS = 1024


@dataclass(eq=False)
class Ticket:
    """A place in the queue."""

    user: str
    on_position: PositionCallback
    granted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop()
                                          .create_future())
    position: int = -1
    released: bool = False


class FairQueue:
    def __init__(self, max_waiting: int, max_per_user: int, slots: int = 1) -> None:
        self.max_waiting = max_waiting
        self.max_per_user = max_per_user
        self._slots = slots
        self._free = slots
        self._users: dict[str, deque[Ticket]] = {}
        # When each user was last served: the least recently served goes first. Bounded LRU.
        self._served: OrderedDict[str, int] = OrderedDict()
        self._tick = 0
        self.service_s = 10.0  # moving average of slot hold time, for retry-after

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._users.values())

    def enqueue(self, user: str, on_position: PositionCallback) -> Ticket:
        """Take a place in the queue now, or raise ``Busy`` (nothing else has happened yet, so a
        refusal leaves no trace). ``hold`` then waits for the slot; ``withdraw`` gives the place
        up if the request never gets that far."""
        mine = self._users.get(user)
        if self.waiting >= self.max_waiting:
            raise Busy(f"the answer queue is full ({self.max_waiting} waiting)",
                       retry_after=self._retry_after(self.waiting))
        if mine is not None and len(mine) >= self.max_per_user:
            raise Busy(f"you already have {len(mine)} questions waiting",
                       retry_after=self._retry_after(len(mine)))
        ticket = Ticket(user, on_position)  # position -1: its first announcement always goes
        self._users.setdefault(user, deque()).append(ticket)
        self._dispatch()
        self._announce()
        return ticket

    @asynccontextmanager
    async def hold(self, ticket: Ticket) -> AsyncIterator[None]:
        """Hold the LLM slot for the body; reports positions while waiting."""
        try:
            await ticket.granted
        except BaseException:
            self.withdraw(ticket)
            raise
        started = time.monotonic()
        try:
            yield
        finally:
            self.service_s = 0.8 * self.service_s + 0.2 * (time.monotonic() - started)
            ticket.released = True
            self._release()

    def withdraw(self, ticket: Ticket) -> None:
        """Give up a place that ``hold`` never used (or left while waiting)."""
        if not self._remove(ticket) and ticket.granted.done() and not ticket.released:
            self._release()  # granted just as it was given up: hand the slot on
        ticket.released = True

    def wait_s(self, position: int) -> float:
        """Estimated seconds until a request at ``position`` starts."""
        return position * self.service_s

    def _retry_after(self, ahead: int) -> float:
        return round(max(1.0, ahead * self.service_s), 1)

    def _remove(self, waiter: Ticket) -> bool:
        mine = self._users.get(waiter.user)
        if mine is None or waiter not in mine:
            return False
        mine.remove(waiter)
        if not mine:
            del self._users[waiter.user]
        self._announce()
        return True

    def _release(self) -> None:
        self._free += 1
        self._dispatch()
        self._announce()

    def _rotation(self) -> list[str]:
        """Users with waiters, least recently served first (never served: by arrival)."""
        return sorted(self._users, key=lambda u: self._served.get(u, -1))

    def _dispatch(self) -> None:
        while self._free and self._users:
            user = self._rotation()[0]
            mine = self._users[user]
            waiter = mine.popleft()
            if not mine:
                del self._users[user]
            if waiter.granted.done():  # its task was cancelled while waiting; it withdraws
                continue
            self._tick += 1
            self._served[user] = self._tick
            self._served.move_to_end(user)
            if len(self._served) > MAX_REMEMBERED_USERS:
                self._served.popitem(last=False)
            self._free -= 1
            waiter.position = 0
            waiter.granted.set_result(None)
            waiter.on_position(0)

    def order(self) -> list[Ticket]:
        """Waiters in the order they will be served: round-robin over users."""
        queues = [list(self._users[u]) for u in self._rotation()]
        depth = max((len(q) for q in queues), default=0)
        return [q[i] for i in range(depth) for q in queues if i < len(q)]

    def _announce(self) -> None:
        running = self._slots - self._free
        for index, waiter in enumerate(self.order()):
            if waiter.position != running + index:
                waiter.position = running + index
                waiter.on_position(waiter.position)
