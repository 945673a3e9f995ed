"""The conversation protocol edgekb.v2 against the real server, through a fault-injecting proxy:
exact resume over many cuts and across restarts, slow and silent peers, shared sessions,
history, cancel.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import DEMO_QUESTION, Server, answer_text, edgekb_env, start_server
from faultproxy import FaultProxy

PROTOCOLS = ("edgekb.v2",)
OTHER_QUESTION = "How do I verify zero energy?"
ENDS = ("done", "error")
MAX_FRAMES = 200_000  # bound on frames read by any one loop below

# One token per delta: many frames, so cuts land everywhere in the stream. One source keeps
# the prompt short (about 280 tokens): every new session reads it whole.
FAST = ("--set", "generation.max_tokens=48", "--set", "server.flush_interval_ms=0",
        "--set", "retrieval.k=1")
HEARTBEAT = ("--set", "generation.max_tokens=64", "--set", "server.flush_interval_ms=0",
             "--set", "retrieval.k=1",
             "--set", "server.heartbeat_s=1", "--set", "server.pong_timeout_s=1",
             "--set", "generation.slots=1")  # a second question waits: the cancel test
SLOW_DROP = ("--set", "generation.max_tokens=64", "--set", "retrieval.k=1",
             "--set", "server.send_timeout_s=2")
RESTART = ("--set", "generation.max_tokens=256", "--set", "server.flush_interval_ms=0",
           "--set", "retrieval.k=1")


# --- servers -------------------------------------------------------------------------------

def _serve_copy(tmp_path_factory: pytest.TempPathFactory, demo_data_dir: Path,
                models_cache: Path, name: str, *settings: str) -> Server:
    """A server on its own copy of the demo data dir (one server per data dir)."""
    data_dir = tmp_path_factory.mktemp(name) / "data"
    shutil.copytree(demo_data_dir, data_dir)
    return start_server(data_dir, edgekb_env(models_cache), *settings)


@pytest.fixture(scope="module")
def fast_server(tmp_path_factory: pytest.TempPathFactory, demo_data_dir: Path,
                models_cache: Path) -> Iterator[Server]:
    srv = _serve_copy(tmp_path_factory, demo_data_dir, models_cache, "fast", *FAST)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def heartbeat_server(tmp_path_factory: pytest.TempPathFactory, demo_data_dir: Path,
                     models_cache: Path) -> Iterator[Server]:
    srv = _serve_copy(tmp_path_factory, demo_data_dir, models_cache, "heartbeat", *HEARTBEAT)
    yield srv
    srv.stop()


def port_of(srv: Server) -> int:
    return int(srv.url.rstrip("/").rsplit(":", 1)[1])


@pytest.fixture
async def proxy_to() -> AsyncIterator[Any]:
    """A factory of fault proxies in front of a server, all closed after the test."""
    proxies: list[FaultProxy] = []

    async def make(srv: Server) -> FaultProxy:
        proxy = await FaultProxy(port_of(srv)).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        await proxy.close()


# --- client helpers ------------------------------------------------------------------------

@dataclass
class Stream:
    """What one connection delivered for one request."""

    events: list[dict[str, Any]] = field(default_factory=list)
    others: list[dict[str, Any]] = field(default_factory=list)  # frames of no/other requests
    close: aiohttp.WSMessage | None = None  # set when the connection ended first
    timed_out: bool = False

    @property
    def ended(self) -> bool:
        return bool(self.events) and self.events[-1]["type"] in ENDS


async def next_json(ws: aiohttp.ClientWebSocketResponse, timeout: float = 30) -> dict[str, Any]:
    """The next frame. The deadline holds while server pings keep coming: aiohttp's own
    receive timeout starts again at every ping it answers, so it never fires here."""
    msg = await asyncio.wait_for(ws.receive(), timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, f"connection ended: {msg}"
    return json.loads(msg.data)


async def read_request(ws: aiohttp.ClientWebSocketResponse, request_id: str,
                       timeout: float = 300, pause_s: float = 0.0) -> Stream:
    """Frames until the request's done/error, the connection's end, or the deadline."""
    stream = Stream()
    deadline = time.monotonic() + timeout
    for _ in range(MAX_FRAMES):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            msg = await asyncio.wait_for(ws.receive(), left)
        except asyncio.TimeoutError:
            break
        if msg.type != aiohttp.WSMsgType.TEXT:
            stream.close = msg
            return stream
        frame = json.loads(msg.data)
        if frame.get("id") == request_id and "seq" in frame:
            stream.events.append(frame)
            if frame["type"] in ENDS:
                return stream
        else:
            stream.others.append(frame)
        if pause_s:
            await asyncio.sleep(pause_s)  # a slow reader that still reads
    stream.timed_out = True
    return stream


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "delta")


def seqs(events: list[dict[str, Any]]) -> list[int]:
    return [e["seq"] for e in events]


def connect(http: aiohttp.ClientSession, url: str, session: str | None = None
            ) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientWebSocketResponse]:
    return http.ws_connect(url + (f"?session={session}" if session else ""),
                           protocols=PROTOCOLS)


async def answer_in_new_session(http: aiohttp.ClientSession, url: str, request_id: str,
                                question: str = DEMO_QUESTION) -> tuple[str, Stream]:
    """(session id, stream) of one uninterrupted answer."""
    async with connect(http, url) as ws:
        session = (await next_json(ws))["session"]
        await ws.send_json({"type": "ask", "id": request_id, "text": question})
        stream = await read_request(ws, request_id)
    assert stream.ended and stream.events[-1]["type"] == "done", stream
    return session, stream


async def ask_in_session(ws: aiohttp.ClientWebSocketResponse, request_id: str,
                         question: str) -> Stream:
    await ws.send_json({"type": "ask", "id": request_id, "text": question})
    stream = await read_request(ws, request_id)
    assert stream.ended and stream.events[-1]["type"] == "done", stream
    return stream


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


async def wait_for_condition(check: Callable[[], bool], timeout: float,
                             step: float = 0.05) -> float | None:
    """Seconds until check() held, or None if it did not within timeout."""
    started = time.monotonic()
    for _ in range(int(timeout / step) + 1):
        if check():
            return time.monotonic() - started
        await asyncio.sleep(step)
    return None


# --- 1. exact resume over many cuts ---------------------------------------------------------

CUTS_WANTED = 100
CUTS_PER_ASK = 20  # then the attempt runs uncut, so every ask ends
MAX_ASKS = 25


async def ask_through_cuts(http: aiohttp.ClientSession, proxy: FaultProxy, request_id: str,
                           rng: random.Random) -> tuple[list[dict[str, Any]], int]:
    """Ask once, then resume after every cut until the answer ends; (events, cuts)."""
    loop = asyncio.get_running_loop()
    session: str | None = None
    events: list[dict[str, Any]] = []
    cuts = 0
    for attempt in range(CUTS_PER_ASK + 10):
        async with connect(http, proxy.ws_url(), session) as ws:
            session = (await next_json(ws))["session"]
            timer: asyncio.TimerHandle | None = None
            if cuts < CUTS_PER_ASK:
                # The first cut is by bytes, so the ask has reached the server before it.
                if attempt == 0 or rng.random() < 0.5:
                    proxy.cut_after(rng.randint(1, 500))
                else:
                    timer = loop.call_later(rng.uniform(0.0, 0.15), proxy.cut)
            after = events[-1]["seq"] if events else 0
            await ws.send_json({"type": "ask", "id": request_id, "text": DEMO_QUESTION}
                               if attempt == 0 else
                               {"type": "resume", "id": request_id, "after": after})
            stream = await read_request(ws, request_id, timeout=120)
            if timer is not None:
                timer.cancel()
            proxy.cut_after(None)
        assert not stream.timed_out, f"{request_id}: nothing more after seq {after}"
        for event in stream.events:
            expected = (events[-1]["seq"] if events else 0) + 1
            assert event["seq"] == expected, (
                f"{request_id}: seq {event['seq']} after {expected - 1} (resumed after "
                f"{after}, cut {cuts}): an event was lost or sent twice")
            events.append(event)
        if stream.ended:
            return events, cuts
        cuts += 1
    raise AssertionError(f"{request_id} did not end after {cuts} cuts: {events[-3:]}")


async def test_resume_reassembles_the_exact_answer_over_a_hundred_cuts(
        fast_server: Server, proxy_to: Any) -> None:
    async with aiohttp.ClientSession(headers=fast_server.headers) as http:
        _, reference = await answer_in_new_session(http, fast_server.ws_url, "reference")
        expected = answer_text(reference.events)
        assert expected

        proxy = await proxy_to(fast_server)
        rng = random.Random(20251125)
        total_cuts = asks = 0
        for asks in range(1, MAX_ASKS + 1):
            events, cuts = await ask_through_cuts(http, proxy, f"cut-{asks}", rng)
            total_cuts += cuts
            done = events[-1]
            assert done["type"] == "done", done
            assert [e["type"] for e in events].count("done") == 1
            assert text_of(events) == expected, (
                f"ask {asks} after {cuts} cuts: reassembled text differs from the uninterrupted "
                f"answer:\n{text_of(events)!r}\n!=\n{expected!r}")
            assert answer_text(events) == expected
            if total_cuts >= CUTS_WANTED:
                break
    assert total_cuts >= CUTS_WANTED, f"only {total_cuts} cuts in {asks} asks"
    assert proxy.cuts >= CUTS_WANTED


# --- 1b. a link that drops after every 1.5 KB -----------------------------------------------

KILOBYTE_LINK = ("--set", "generation.max_tokens=48", "--set", "server.flush_interval_ms=0",
                 "--set", "retrieval.k=4")
CUT_EVERY_BYTES = 1536  # the whole budget of a connection: upgrade, welcome and events


async def test_a_link_that_drops_every_kilobyte_still_delivers_the_whole_answer(
        tmp_path_factory: pytest.TempPathFactory, demo_data_dir: Path, models_cache: Path,
        proxy_to: Any) -> None:
    srv = _serve_copy(tmp_path_factory, demo_data_dir, models_cache, "kilobyte", *KILOBYTE_LINK)
    try:
        async with aiohttp.ClientSession(headers=srv.headers) as http:
            _, reference = await answer_in_new_session(http, srv.ws_url, "reference")
            proxy = await proxy_to(srv)
            session: str | None = None
            events: list[dict[str, Any]] = []
            stalls = 0
            for attempt in range(400):  # bounded: far more connections than events
                proxy.cut_after(CUT_EVERY_BYTES)
                before = len(events)
                async with connect(http, proxy.ws_url(), session) as ws:
                    welcome = await next_json(ws)
                    session = welcome["session"]
                    after = events[-1]["seq"] if events else 0
                    await ws.send_json({"type": "ask", "id": "k", "text": DEMO_QUESTION}
                                       if attempt == 0 else
                                       {"type": "resume", "id": "k", "after": after})
                    stream = await read_request(ws, "k", timeout=60)
                proxy.cut_after(None)
                for event in stream.events:
                    assert event["seq"] == (events[-1]["seq"] if events else 0) + 1, event
                    events.append(event)
                if stream.ended:
                    break
                stalls += len(events) == before
            else:
                raise AssertionError(f"no end after 400 connections, at seq {events[-1]['seq']}")
    finally:
        srv.stop()
    assert stalls == 0, f"{stalls} connections delivered 1.5 KB without a whole event"
    assert proxy.cuts >= 3, "the answer should have needed several connections"
    # The reference read its prompt afresh; this answer found it cached (the reference
    # session's pre-read head starts with it), so it may report fewer reading steps.
    assert _kinds(events) == _kinds(reference.events)
    assert answer_text(events) == answer_text(reference.events)


def _kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events
            if e["type"] != "status" or "progress" not in e]


# --- 2. resume of a finished answer, unknown ids, reused ids -------------------------------

async def test_resume_after_the_answer_ended_replays_exactly_the_missing_events(
        fast_server: Server) -> None:
    url = fast_server.ws_url
    async with aiohttp.ClientSession(headers=fast_server.headers) as http:
        session, original = await answer_in_new_session(http, url, "fin")
        events = original.events
        k = len(events) // 2

        async with connect(http, url, session) as ws:
            welcome = await next_json(ws)
            assert welcome["session"] == session and welcome["resumed"] is True
            await ws.send_json({"type": "resume", "id": "fin", "after": 0})
            assert (await read_request(ws, "fin")).events == events
            await ws.send_json({"type": "resume", "id": "fin", "after": k})
            replay = await read_request(ws, "fin")
            assert replay.events == events[k:], "resume after=k must give exactly k+1..end"
            # Nothing else follows: the very next frame is the answer to a ping.
            await ws.send_json({"type": "ping"})
            assert (await next_json(ws))["type"] == "pong"

            await ws.send_json({"type": "resume", "id": "never-asked", "after": 0})
            error = await next_json(ws)
            assert error["type"] == "error" and error["code"] == "unknown_request", error
            assert error["id"] == "never-asked"

            await ws.send_json({"type": "ask", "id": "fin", "text": OTHER_QUESTION})
            error = await next_json(ws)
            assert error["type"] == "error" and error["code"] == "id_reuse", error
            assert error["id"] == "fin"
            await ws.send_json({"type": "ping"})
            assert (await next_json(ws))["type"] == "pong"

        # The same through hello on a connection that started in another session.
        async with connect(http, url) as ws:
            assert (await next_json(ws))["session"] != session
            await ws.send_json({"type": "hello", "session": session,
                                "resume": [{"id": "fin", "after": k}]})
            welcome = await next_json(ws)
            assert welcome["type"] == "welcome" and welcome["session"] == session
            assert welcome["resumed"] is True
            assert (await read_request(ws, "fin")).events == events[k:]


# --- 3. resume across a server restart ------------------------------------------------------

@pytest.fixture(scope="module")
def restart_data_dir(tmp_path_factory: pytest.TempPathFactory, demo_data_dir: Path) -> Path:
    data_dir = tmp_path_factory.mktemp("restart") / "data"
    shutil.copytree(demo_data_dir, data_dir)
    return data_dir


async def _interrupt_then_resume(data_dir: Path, models_cache: Path, request_id: str,
                                 hard: bool) -> None:
    env = edgekb_env(models_cache)
    srv = start_server(data_dir, env, *RESTART)
    try:
        async with aiohttp.ClientSession(headers=srv.headers) as http, \
                connect(http, srv.ws_url) as ws:
            session = (await next_json(ws))["session"]
            await ws.send_json({"type": "ask", "id": request_id, "text": DEMO_QUESTION})
            seen: list[dict[str, Any]] = []
            for _ in range(MAX_FRAMES):
                event = await next_json(ws, timeout=120)
                assert event["type"] not in ENDS, f"ended before the stop: {event}"
                seen.append(event)
                if event["type"] == "delta":
                    break  # stop right as the answer starts streaming
            if hard:
                srv.process.kill()
                await asyncio.to_thread(srv.process.wait, 30)
            else:
                await asyncio.to_thread(srv.stop)
            tail = await read_request(ws, request_id, timeout=30)
        assert tail.close is not None, f"the connection outlived the server: {tail}"
        if not hard:
            assert any(f.get("type") == "notice" and f.get("event") == "shutdown"
                       for f in tail.others), "a graceful stop tells clients first"
            assert tail.close.type == aiohttp.WSMsgType.CLOSE and tail.close.data == 1001
        seen += tail.events
        assert seqs(seen) == list(range(1, len(seen) + 1))
        assert not tail.ended, "the answer ended before the stop; nothing to interrupt"
        last = seen[-1]["seq"]
    finally:
        srv.stop()

    srv = start_server(data_dir, env, *RESTART)
    try:
        async with aiohttp.ClientSession(headers=srv.headers) as http, \
                connect(http, srv.ws_url, session) as ws:
            assert (await next_json(ws))["resumed"] is True
            await ws.send_json({"type": "resume", "id": request_id, "after": last})
            rest = await read_request(ws, request_id, timeout=15)
            await ws.send_json({"type": "resume", "id": request_id, "after": 0})
            stored = await read_request(ws, request_id, timeout=20)
    finally:
        srv.stop()
    kind = "kill -9" if hard else "SIGTERM"
    assert stored.events[:len(seen)] == seen, (
        f"BUG: after {kind} mid-answer and a restart, the stored log differs from what the client "
        f"was sent: seqs the client saw mean other events now (seq reused): "
        f"sent {seen[len(seen) - 3:]}, stored {stored.events[len(seen) - 3:len(seen) + 1]}")
    assert rest.ended, (
        f"BUG: after {kind} mid-answer and a restart, resume after={last} (the last seq the client "
        f"received) gets nothing: the log ends at seq "
        f"{stored.events[-1]['seq'] if stored.events else None} "
        f"({stored.events[-1]['type'] if stored.events else None})")
    assert seqs(rest.events) == list(range(last + 1, last + 1 + len(rest.events)))
    end = rest.events[-1]
    assert end["type"] == "error" and end["code"] == "interrupted", end
    assert end["chars"] == len(text_of(seen + rest.events)), (
        "the interrupted error counts exactly the text that was written")
    assert end["chars"]


async def test_resume_after_a_graceful_restart_ends_with_interrupted(
        restart_data_dir: Path, models_cache: Path) -> None:
    await _interrupt_then_resume(restart_data_dir, models_cache, "term", hard=False)


async def test_resume_after_a_kill_ends_with_interrupted_and_no_seq_twice(
        restart_data_dir: Path, models_cache: Path) -> None:
    await _interrupt_then_resume(restart_data_dir, models_cache, "kill", hard=True)


# --- 4. a client that never reads -----------------------------------------------------------

def _masked_text_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    size = len(payload)
    header = bytes([0x81, 0x80 | size]) if size < 126 else \
        bytes([0x81, 0x80 | 126]) + size.to_bytes(2, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _flood_without_reading(sock: socket.socket, port: int, session: str, frames: int,
                                 seconds: float, token: str) -> int:
    """A raw WebSocket client that asks, then sends `history` requests and never reads a byte.
    Returns how many history requests the kernel took."""
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws?session={session} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Authorization: Bearer {token}\r\n"
                  "Sec-WebSocket-Protocol: edgekb.v2\r\n\r\n").encode())
    sock.sendall(_masked_text_frame(json.dumps(
        {"type": "ask", "id": "stalled", "text": OTHER_QUESTION}).encode()))
    history = _masked_text_frame(b'{"type":"history","limit":50}')
    payload = history * frames
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + seconds
    for _ in range(frames + int(seconds / 0.05) + 1):
        if sent >= len(payload) or time.monotonic() > deadline:
            break
        try:
            sent += sock.send(payload[sent:sent + 65536])
        except BlockingIOError:
            await asyncio.sleep(0.05)  # the server stopped reading: what a bounded server does
    return sent // len(history)


async def test_a_client_that_never_reads_costs_bounded_memory_and_others_go_on(
        tmp_path_factory: pytest.TempPathFactory, demo_data_dir: Path,
        models_cache: Path) -> None:
    srv = _serve_copy(tmp_path_factory, demo_data_dir, models_cache, "stalled", *FAST)
    try:
        port = port_of(srv)
        async with aiohttp.ClientSession(headers=srv.headers) as http, \
                connect(http, srv.ws_url) as ws:
            session = (await next_json(ws))["session"]
            await ask_in_session(ws, "warm", DEMO_QUESTION)  # each history page: over 1 KiB
            before = rss_kib(srv.process.pid)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                requests = await _flood_without_reading(sock, port, session, 100_000, 5.0,
                                                        srv.token)
                # Meanwhile another client of the same session gets a whole answer.
                other = await ask_in_session(ws, "meanwhile", OTHER_QUESTION)
                assert answer_text(other.events)
                await asyncio.sleep(1.0)
                grown_mib = (rss_kib(srv.process.pid) - before) / 1024
                assert grown_mib < 32, (
                    f"server RSS grew by {grown_mib:.0f} MiB while a client that never reads "
                    f"sent {requests} history requests")
            # Closed: the stalled client has gone for good.
            await asyncio.sleep(1.0)
            await ws.send_json({"type": "ping"})
            assert (await next_json(ws))["type"] == "pong"
        # Everything that client held is released: the server stops promptly.
        srv.process.terminate()
        try:
            await asyncio.to_thread(srv.process.wait, 15)
        except subprocess.TimeoutExpired:
            srv.process.kill()
            raise AssertionError(
                "BUG: after a client that had stopped reading closed its socket, SIGTERM did "
                "not stop the server within 15 s: its connection handler is still blocked "
                "on a full outbox whose writer has gone") from None
    finally:
        srv.stop()


# --- 5. two connections of one session follow one answer ----------------------------------

async def test_two_connections_of_one_session_follow_the_same_live_answer(
        fast_server: Server) -> None:
    url = fast_server.ws_url
    async with aiohttp.ClientSession(headers=fast_server.headers) as http, \
            connect(http, url) as first:
        session = (await next_json(first))["session"]
        async with connect(http, url, session) as second:
            assert (await next_json(second))["session"] == session
            await first.send_json({"type": "ask", "id": "shared", "text": DEMO_QUESTION})
            head: list[dict[str, Any]] = []
            for _ in range(MAX_FRAMES):
                event = await next_json(first, timeout=120)
                head.append(event)
                if event["type"] in ("delta", *ENDS):
                    break
            assert head[-1]["type"] == "delta", "the answer must still be streaming"
            await second.send_json({"type": "resume", "id": "shared", "after": 0})
            rest, follower = await asyncio.gather(read_request(first, "shared"),
                                                  read_request(second, "shared"))
    asker = head + rest.events
    assert asker[-1]["type"] == "done" and seqs(asker) == list(range(1, len(asker) + 1))
    assert follower.events == asker, "both connections see the same events"
    assert text_of(follower.events) == answer_text(asker)


# --- 6. history -----------------------------------------------------------------------------

async def _history(ws: aiohttp.ClientWebSocketResponse, **fields: Any) -> dict[str, Any]:
    await ws.send_json({"type": "history", **fields})
    page = await next_json(ws)
    assert page["type"] == "history", page
    return page


async def test_history_returns_the_turns_in_order_with_paging(fast_server: Server) -> None:
    async with aiohttp.ClientSession(headers=fast_server.headers) as http, \
            connect(http, fast_server.ws_url) as ws:
        session = (await next_json(ws))["session"]
        one = await ask_in_session(ws, "h1", DEMO_QUESTION)
        two = await ask_in_session(ws, "h2", OTHER_QUESTION)
        right_after_done = await _history(ws)  # what a page shows when it reloads now
        page = right_after_done
        for _ in range(50):  # bounded: 5 s for the last turn to be recorded
            if len(page["turns"]) >= 2:
                break
            await asyncio.sleep(0.1)
            page = await _history(ws)

        assert page["session"] == session and page["more"] is False
        turns = page["turns"]
        assert [(t["id"], t["question"]) for t in turns] == [("h1", DEMO_QUESTION),
                                                              ("h2", OTHER_QUESTION)]
        assert [t["answer"] for t in turns] == [answer_text(one.events), answer_text(two.events)]
        assert [t["finish"] for t in turns] == [one.events[-1]["finish"],
                                                two.events[-1]["finish"]]
        assert turns[0]["turn"] < turns[1]["turn"] and turns[0]["at"] <= turns[1]["at"]
        assert turns[0]["sources"] and turns[0]["sources"][0]["doc"] == "pump-manual.md"

        newest = await _history(ws, limit=1)
        assert [t["id"] for t in newest["turns"]] == ["h2"] and newest["more"] is True
        older = await _history(ws, limit=1, before=newest["turns"][0]["turn"])
        assert older["turns"] == [turns[0]] and older["more"] is False

    assert right_after_done == page, (
        "BUG: history asked right after `done` of h2 lacks that turn "
        f"({[t['id'] for t in right_after_done['turns']]}): done is sent before the turn "
        "is written")


# --- 7. cancel ------------------------------------------------------------------------------

async def test_cancel_stops_the_answer_quickly_and_the_connection_goes_on(
        heartbeat_server: Server) -> None:
    async with aiohttp.ClientSession(headers=heartbeat_server.headers) as http, \
            connect(http, heartbeat_server.ws_url) as ws:
        await next_json(ws)
        await ws.send_json({"type": "ask", "id": "long", "text": DEMO_QUESTION})
        await ws.send_json({"type": "ask", "id": "waiting", "text": OTHER_QUESTION})
        head: list[dict[str, Any]] = []
        for _ in range(MAX_FRAMES):
            event = await next_json(ws, timeout=120)
            head.append(event)
            if event.get("id") == "long" and event["type"] in ("delta", *ENDS):
                break
        assert head[-1]["type"] == "delta", head[-1]
        queued = [e for e in head if e.get("id") == "waiting" and e["type"] == "queued"]
        assert queued and queued[0]["seq"] == 1 and queued[0]["position"] == 1
        assert queued[0]["wait_s"] > 0, "a waiting question is told how long it may wait"

        # A queued request leaves the queue at once.
        await ws.send_json({"type": "cancel", "id": "waiting"})
        waiting = await read_request(ws, "waiting", timeout=5)
        assert waiting.ended and waiting.events[-1]["type"] == "done", waiting
        assert waiting.events[-1]["finish"] == "cancelled"

        started = time.monotonic()
        await ws.send_json({"type": "cancel", "id": "long"})
        rest = await read_request(ws, "long", timeout=10)
        took = time.monotonic() - started
        assert rest.ended, rest
        done = rest.events[-1]
        assert done["type"] == "done" and done["finish"] == "cancelled", done
        assert took < 1.5, f"cancel took {took:.2f} s"
        long_events = [e for e in head + waiting.others if e.get("id") == "long"] + rest.events
        assert done["chars"] == len(text_of(long_events)) and done["chars"]
        assert done["usage"]["completion_tokens"] < 64

        await ws.send_json({"type": "ask", "id": "after", "text": OTHER_QUESTION})
        after = await read_request(ws, "after")
        assert after.ended and after.events[-1]["type"] == "done", after
        assert answer_text(after.events)


# --- 8. heartbeats: a stalled or slow link that TCP acknowledges is kept -------------------

async def test_a_stalled_link_is_pinged_but_kept_while_its_tcp_acknowledges(
        heartbeat_server: Server, proxy_to: Any) -> None:
    """Wi-Fi roaming stalls a link for seconds. Through a stalled proxy the peer's TCP still
    acknowledges every byte (the proxy's kernel does), so the server pings but must not drop
    the link; once it flows again the client answers the queued pings and goes on."""
    proxy = await proxy_to(heartbeat_server)
    async with aiohttp.ClientSession(headers=heartbeat_server.headers) as http, \
            connect(http, proxy.ws_url()) as ws:
        welcome = await next_json(ws)
        assert welcome["heartbeat"] == {"interval_s": 1.0, "timeout_s": 1.0}
        [link] = proxy.links
        proxy.stall()
        # heartbeat_s of silence, then a protocol ping (opcode 0x9) heads for the client.
        pinged = await wait_for_condition(
            lambda: link.held_for_client()[:1] == b"\x89", timeout=10)
        assert pinged is not None and pinged < 5, "no heartbeat ping to a silent peer"
        await asyncio.sleep(4)  # twice heartbeat_s + pong_timeout_s
        assert not link.server_gone(), "a link whose TCP acknowledges was dropped"
        proxy.flow()
        await ws.send_json({"type": "ping"})
        assert (await next_json(ws)) == {"type": "pong"}


async def test_a_slow_link_that_keeps_reading_is_not_closed(heartbeat_server: Server,
                                                            proxy_to: Any) -> None:
    rate = 1024
    async with aiohttp.ClientSession(headers=heartbeat_server.headers) as http:
        # A long finished answer replayed over the slow link: the backlog is all there at once,
        # however fast the model was.
        session, original = await answer_in_new_session(http, heartbeat_server.ws_url, "slow")
        size = sum(len(json.dumps(e, ensure_ascii=False, separators=(",", ":")))
                   for e in original.events)
        assert size / rate > 3, "the replay must take several heartbeat periods"
        proxy = await proxy_to(heartbeat_server)
        proxy.rate_bytes_per_s = rate
        proxy.latency_s = 0.05
        async with connect(http, proxy.ws_url(), session) as ws:
            await next_json(ws)
            [link] = proxy.links
            started = time.monotonic()
            await ws.send_json({"type": "resume", "id": "slow", "after": 0})
            replay = await read_request(ws, "slow", timeout=60, pause_s=0.005)
            took = time.monotonic() - started
            assert replay.close is None, (
                f"the server closed a connection that was reading at {rate} B/s after "
                f"{took:.1f} s, seq {replay.events[-1]['seq'] if replay.events else 0}/"
                f"{len(original.events)}: {replay.close}")
            assert replay.events == original.events
            assert took > 2, "the link was not slower than heartbeat + timeout"
            # The connection is still open: a ping is answered, not met by a close.
            await ws.send_json({"type": "ping"})
            reply = await asyncio.wait_for(ws.receive(), 30)
            assert reply.type == aiohttp.WSMsgType.TEXT and json.loads(reply.data) == {
                "type": "pong"}, (
                f"the server closed a connection that kept reading at {rate} B/s "
                f"({size} bytes in {took:.1f} s): {reply}")
            assert not link.server_gone()


# --- 9. a reader too slow for send_timeout_s is dropped, then resumes ------------------------

async def test_a_client_that_stops_reading_is_dropped_and_resumes_completely(
        tmp_path_factory: pytest.TempPathFactory, demo_data_dir: Path, models_cache: Path,
        proxy_to: Any) -> None:
    srv = _serve_copy(tmp_path_factory, demo_data_dir, models_cache, "drop", *SLOW_DROP)
    try:
        proxy = await proxy_to(srv)
        async with aiohttp.ClientSession(headers=srv.headers) as http:
            async with connect(http, proxy.ws_url()) as ws:
                session = (await next_json(ws))["session"]
                await ask_in_session(ws, "warm", DEMO_QUESTION)
                [link] = proxy.links
                # Stop taking anything from the server, then make it send far more than the
                # socket buffers between us hold (about 4 MiB on loopback): the answer plus
                # 10000 history pages of a session with one turn (over 1 KiB each).
                proxy.stall(client_to_server=False)
                await ws.send_json({"type": "ask", "id": "dropped", "text": DEMO_QUESTION})

                async def flood() -> None:
                    for _ in range(10_000):
                        await ws.send_str('{"type":"history","limit":50}')

                with contextlib.suppress(asyncio.TimeoutError):  # the server may stop reading
                    await asyncio.wait_for(flood(), 30)
                closed_in = await wait_for_condition(link.server_gone, timeout=15)
                proxy.flow()
                seen = await read_request(ws, "dropped", timeout=60)
                if seen.close is None and not seen.timed_out:
                    tail = await read_request(ws, "no-such-request", timeout=60)
                    seen.close = tail.close
            assert seen.close is not None, "the stalled connection was never closed"
            # 4010 when the close frame gets through; a reset drops it together with the
            # frames still queued (the server closed with our requests unread).
            assert seen.close.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR) or (
                seen.close.type == aiohttp.WSMsgType.CLOSE and seen.close.data == 4010), (
                f"expected close 4010 (too slow), got {seen.close}")
            rest = Stream()
            if not seen.ended:  # the usual case: the drop cut the answer short
                last = seen.events[-1]["seq"] if seen.events else 0
                async with connect(http, srv.ws_url, session) as ws:
                    await next_json(ws)
                    await ws.send_json({"type": "resume", "id": "dropped", "after": last})
                    rest = await read_request(ws, "dropped")
    finally:
        srv.stop()
    events = seen.events + rest.events
    assert events and events[-1]["type"] == "done", rest
    assert seqs(events) == list(range(1, len(events) + 1))
    assert answer_text(events)
    assert closed_in is not None, (
        "BUG: a client that stopped reading was not disconnected while it stayed stalled: the "
        "server noticed the send timeout but its close waits for the peer to take data")
