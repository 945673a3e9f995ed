"""Soak clients: ask, read slowly, drop the link at random, resume; check every seq and text.

A client keeps, per request, the highest seq it received. On a fresh connection the server must
send exactly seq+1, seq+2, ...: a jump is counted as lost events, a seq at or below the highest
as a duplicate (this client never resumes on a connection that is already following the
request, so no duplicate is legitimate). The deltas kept must add up to `done.text`.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from edgekb.protocol import PROTOCOL, encode

QUESTIONS_FILE = Path(__file__).resolve().parents[2] / "tests" / "data" / "demo_questions.md"
FRAME_TIMEOUT_S = 60.0   # no frame (pongs do not count) for this long: treat the link as dead
CONNECT_TIMEOUT_S = 20.0  # a lost SYN costs 1 s, then 3 s, ... on a lossy link
MAX_CONNECTIONS = 100    # per request
MAX_BACKOFF_S = 3.0
READ_PAUSE_S = 0.05      # a slow reader: up to this between frames...
STALL_P, STALL_S = 0.02, (1.0, 4.0)  # ...and now and then a long pause (phone in a pocket)
DROP_P = 0.04            # chance, after each frame, that the client drops its connection
REJOIN_S = (0.1, 1.0)    # how long a dropped client takes to come back


def demo_questions() -> list[str]:
    rows = re.findall(r"^\| ([^|]+\?) \|", QUESTIONS_FILE.read_text(), re.MULTILINE)
    if not rows:
        raise RuntimeError(f"no questions found in {QUESTIONS_FILE}")
    return [row.strip() for row in rows]


@dataclass
class Stats:
    started: int = 0
    completed: int = 0          # ended with done, seqs and text checked
    resumes: int = 0            # resume frames sent after a reconnect
    reasks: int = 0             # the ask never reached the server: asked again on reconnect
    client_drops: int = 0       # connections this client dropped on purpose
    link_losses: int = 0        # connections that ended or failed without the client's doing
    events: int = 0
    lost_events: int = 0
    duplicated_events: int = 0
    text_mismatches: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    request_s: list[float] = field(default_factory=list)     # ask to done, as the client saw it
    server_total_s: list[float] = field(default_factory=list)  # done.timings.total_ms


class _Closed(Exception):
    pass


class _Request:
    """One question's state across connections."""

    def __init__(self, request_id: str, question: str) -> None:
        self.id = request_id
        self.question = question
        self.session: str | None = None
        self.asked = False
        self.last_seq = 0
        self.deltas: list[str] = []
        self.started = time.monotonic()


async def run_client(index: int, url: str, stop_at: float, give_up_at: float, stats: Stats,
                     questions: list[str], seed: int, token: str) -> None:
    """Ask questions until stop_at; the one in flight then may go on until give_up_at."""
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S,
                                    connect=CONNECT_TIMEOUT_S)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as http:
        for number in range(1, 1_000_000):  # bounded by stop_at in practice
            if time.monotonic() >= stop_at:
                return
            request = _Request(f"c{index}-{number}", rng.choice(questions))
            stats.started += 1
            await _one_request(http, url, request, give_up_at, stats, rng)


async def _one_request(http: aiohttp.ClientSession, url: str, request: _Request,
                       give_up_at: float, stats: Stats, rng: random.Random) -> None:
    failures = 0
    for _ in range(MAX_CONNECTIONS):
        if time.monotonic() >= give_up_at:
            stats.errors["client:unfinished"] += 1
            return
        target = f"{url}?session={request.session}" if request.session else url
        try:
            async with http.ws_connect(target, protocols=(PROTOCOL,), heartbeat=15,
                                       timeout=aiohttp.ClientWSTimeout(ws_close=2)) as ws:
                failures = 0
                if await _converse(ws, request, give_up_at, stats, rng):
                    return
                stats.client_drops += 1
                _drop(ws)
            await asyncio.sleep(rng.uniform(*REJOIN_S))
        except (aiohttp.ClientError, ConnectionError, OSError, asyncio.TimeoutError, _Closed):
            stats.link_losses += 1
            failures += 1
            await asyncio.sleep(min(MAX_BACKOFF_S, 0.2 * 2 ** failures) * rng.uniform(0.5, 1))
    stats.errors["client:gave_up"] += 1


def _drop(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Go away like a phone leaving Wi-Fi: no WebSocket close frame, the TCP link just ends."""
    sock = ws.get_extra_info("socket")
    if sock is not None:
        sock.shutdown(socket.SHUT_RDWR)


async def _receive(ws: aiohttp.ClientWebSocketResponse, give_up_at: float) -> dict[str, Any]:
    wait = min(FRAME_TIMEOUT_S, give_up_at - time.monotonic())
    if wait <= 0:
        raise _Closed("out of time")
    msg = await ws.receive(timeout=wait)
    if msg.type != aiohttp.WSMsgType.TEXT:
        raise _Closed(f"connection closed ({ws.close_code})")
    return json.loads(msg.data)


async def _converse(ws: aiohttp.ClientWebSocketResponse, request: _Request, give_up_at: float,
                    stats: Stats, rng: random.Random) -> bool:
    """One connection's worth of the request; True once it ended (done or error), False when
    the client decided to drop the link. Link failures raise."""
    welcome = await _receive(ws, give_up_at)
    if welcome.get("type") != "welcome":
        raise _Closed(f"expected welcome, got {welcome.get('type')}")
    if request.session is None:
        request.session = welcome["session"]
    if request.asked:
        await ws.send_str(encode({"type": "resume", "id": request.id, "after": request.last_seq}))
        stats.resumes += 1
    else:
        await ws.send_str(encode({"type": "ask", "id": request.id, "text": request.question}))
        request.asked = True
    for _ in range(100_000):  # bounded by give_up_at in practice
        message = await _receive(ws, give_up_at)
        if message.get("id") != request.id:
            continue  # notices
        if "seq" not in message:
            # An error answering the frame itself rather than an event of the request.
            code = message.get("code", "?")
            if code == "unknown_request":
                # The ask was lost with the old link before the server took it.
                await ws.send_str(encode({"type": "ask", "id": request.id,
                                          "text": request.question}))
                stats.reasks += 1
                continue
            if code == "id_reuse":
                # That ask had arrived after all, just later than our resume: follow it.
                await ws.send_str(encode({"type": "resume", "id": request.id,
                                          "after": request.last_seq}))
                stats.resumes += 1
                continue
            stats.errors[f"frame:{code}"] += 1
            return True
        stats.events += 1
        seq = message["seq"]
        if seq <= request.last_seq:
            stats.duplicated_events += 1
            continue
        if seq > request.last_seq + 1:
            stats.lost_events += seq - request.last_seq - 1
        request.last_seq = seq
        kind = message["type"]
        if kind == "delta":
            request.deltas.append(message["text"])
        elif kind == "done":
            stats.completed += 1
            stats.request_s.append(time.monotonic() - request.started)
            stats.server_total_s.append(message.get("timings", {}).get("total_ms", 0) / 1000)
            if "".join(request.deltas) != message["text"]:
                stats.text_mismatches += 1
            return True
        elif kind == "error":
            stats.errors[message.get("code", "?")] += 1
            return True
        pause = rng.uniform(*STALL_S) if rng.random() < STALL_P else rng.uniform(0, READ_PAUSE_S)
        await asyncio.sleep(pause)
        if rng.random() < DROP_P:
            return False
    raise _Closed("too many frames for one request")
