"""Many connections: server memory per idle connection, and event-loop lag under fan-out.

Idle connections each keep a reader task on the client side, because aiohttp answers the
server's heartbeat pings only inside receive(). Memory is the server's VmRSS growth divided by
the number of connections, against a bare aiohttp WebSocket server (benchlib.rawws) holding the
same number in the same run. Loop lag is the round trip of application pings sent every 20 ms
by a separate process (benchlib.pinger) while 100 connections of one session follow one answer
and the idle connections stay open; the round trip is an upper bound of the server's loop lag
(it adds loopback and the pinger's own loop, measured idle in the same run).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from edgekb.events import text_digest

from .common import benchlib_env, cpu_seconds, log, percentile, proc_status_kb
from .server import Answer, Server, connect, follow, send_ask

CONNECT_CONCURRENCY = 100
PING_INTERVAL_S = 0.02


def client_session(headers: dict[str, str] | None = None) -> aiohttp.ClientSession:
    # limit=0: websockets keep their connector slot, and we hold thousands.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=headers,
                                 timeout=aiohttp.ClientTimeout(total=60))


@dataclass
class IdlePool:
    http: aiohttp.ClientSession
    sockets: list[aiohttp.ClientWebSocketResponse] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    closed_by_server: int = 0

    async def open(self, url: str, count: int) -> float:
        """Open ``count`` more connections (each waits for its welcome); returns seconds taken."""
        started = time.perf_counter()
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one() -> None:
            async with gate:
                ws, _ = await connect(self.http, url)
            self.sockets.append(ws)
            self.readers.append(asyncio.create_task(self._read(ws)))

        await asyncio.gather(*(one() for _ in range(count)))
        return time.perf_counter() - started

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for _ in ws:  # answers pings; ends when the connection closes
            pass
        self.closed_by_server += 1

    async def close(self) -> None:
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        self.readers.clear()
        self.sockets.clear()


async def idle_growth_kb(pid: int, url: str, http: aiohttp.ClientSession, pool: IdlePool,
                         count: int, settle_s: float) -> float:
    """Server RSS growth per connection when ``pool`` grows to ``count`` connections."""
    before = proc_status_kb(pid, "VmRSS")
    added = count - len(pool.sockets)
    took = await pool.open(url, added)
    await asyncio.sleep(settle_s)
    after = proc_status_kb(pid, "VmRSS")
    log(f"  {added} connections opened in {took:.1f} s; server RSS +{(after - before) / 1024:.1f}"
        f" MB")
    return (after - before) / added


async def raw_baseline(counts: list[int], settle_s: float) -> dict[int, float]:
    """KB per idle connection of a bare aiohttp server, at each count."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchlib.rawws", env=benchlib_env(),
        stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        url = f"ws://127.0.0.1:{int(line)}/ws"
        result = {}
        async with client_session() as http:
            pool = IdlePool(http)
            for count in counts:
                result[count] = await idle_growth_kb(process.pid, url, http, pool,
                                                     count, settle_s)
            await pool.close()
        return result
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


async def loop_lag(server: Server, http: aiohttp.ClientSession, question: str,
                   followers: int, idle_window_s: float) -> dict[str, Any]:
    """Ping round trips while ``followers`` connections of one session follow one answer."""
    pinger = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchlib.pinger", server.ws_url, str(PING_INTERVAL_S), "600",
        env={**benchlib_env(), "EDGEKB_TOKEN": server.token}, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE)
    assert pinger.stdout is not None
    try:
        ready = await asyncio.wait_for(pinger.stdout.readline(), 60)
        if ready.strip() != b"ready":
            raise RuntimeError(f"pinger did not start: {ready!r}")
        first, welcome = await connect(http, server.ws_url)
        session = welcome["session"]
        rest = await asyncio.gather(*(connect(http, server.ws_url, session)
                                      for _ in range(followers - 1)))
        await asyncio.sleep(idle_window_s)  # pings with only idle connections: the baseline
        asked_at = time.monotonic()
        cpu_before = _cpu(server.pid, pinger.pid)
        answer = await send_ask(first, "lag", question)
        await follow(first, "lag", answer, until="queued")
        resumed = []
        for ws, _ in rest:
            await ws.send_str(json.dumps({"type": "resume", "id": "lag", "after": 0}))
            resumed.append(Answer(time.perf_counter()))
        await asyncio.gather(follow(first, "lag", answer),
                             *(follow(ws, "lag", a) for (ws, _), a in zip(rest, resumed)))
        done_at = time.monotonic()
        cpu_used = {name: round((after - cpu_before[name]) / (done_at - asked_at), 3)
                    for name, after in _cpu(server.pid, pinger.pid).items()}
        for ws, _ in [(first, None), *rest]:
            await ws.close()
    finally:
        out, _ = await asyncio.wait_for(pinger.communicate(b"stop\n"), 60)
    samples = json.loads(out.decode().strip().splitlines()[-1])
    idle = [rtt for at, rtt in samples if at < asked_at]
    window = [(at, rtt) for at, rtt in samples if asked_at <= at <= done_at]
    busy = [rtt for _, rtt in window]
    if not busy or not idle:
        raise RuntimeError(f"too few ping samples: {len(idle)} idle, {len(busy)} busy")
    worst_at, worst = max(window, key=lambda s: s[1])
    complete = sum(1 for a in [answer, *resumed] if _complete(a))
    return {"busy_p50_ms": percentile(busy, 50), "busy_p99_ms": percentile(busy, 99),
            "busy_max_ms": max(busy), "busy_samples": len(busy),
            "busy_slowest_ms": [round(rtt, 1) for rtt in sorted(busy)[-5:]],
            # Where the worst stall fell: near 0 means at the end of the answer.
            "worst_ended_ms_before_done": round((done_at - worst_at) * 1000 - worst, 1),
            "idle_p50_ms": percentile(idle, 50), "idle_p99_ms": percentile(idle, 99),
            "idle_samples": len(idle), "followers_complete": complete,
            "followers": followers, "answer": answer,
            # Cores each part kept busy from the question to the last follower's done: the
            # followers' clients and the pinger share the server's two cores in this bench.
            "cores_busy": cpu_used}


def _cpu(server_pid: int, pinger_pid: int) -> dict[str, float]:
    return {"server": cpu_seconds(server_pid),
            "server_event_loop": cpu_seconds(server_pid, server_pid),
            "bench_clients": time.process_time(),
            "pinger": cpu_seconds(pinger_pid)}


def _complete(answer: Answer) -> bool:
    """Every event from seq 1 to done, none twice, deltas adding up to done.text."""
    if not answer.events or answer.events[-1].get("type") != "done":
        return False
    seqs = [e["seq"] for e in answer.events]
    done = answer.events[-1]
    return (seqs == list(range(1, len(seqs) + 1)) and len(answer.text) == done["chars"]
            and text_digest(answer.text) == done["sha256"])
