"""SSE, the OpenAI-compatible API and /metrics against the real server and the default models,
with real clients: curl, aiohttp through a proxy that cuts the stream at random points, the
official `openai` client, prometheus-client's own parser. Greedy decoding, so the same question
in a new session gets the same answer: the reference every reassembled answer must equal.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sse_client import SseParser, answer_of, read_events, request_events

from conftest import DEMO_QUESTION, Server, collect, edgekb_env, issue_token, start_server
from faultproxy import FaultProxy

# One token per delta (many events: cuts land everywhere), one source (a short prompt).
HTTP_FAST = ("--set", "generation.max_tokens=64", "--set", "server.flush_interval_ms=0",
             "--set", "retrieval.k=1")
SSE = {"Accept": "text/event-stream"}
ANSWER_TIMEOUT_S = 300  # a 64-token answer takes seconds; other work on 2 cores slows it a lot
CUTS = 50
MAX_ATTEMPTS = 2000     # connections any cut loop makes at most


def port_of(srv: Server) -> int:
    return int(srv.url.rstrip("/").rsplit(":", 1)[1])


def _copy(tmp_path_factory: pytest.TempPathFactory, demo_data_dir: Path, name: str) -> Path:
    data_dir = tmp_path_factory.mktemp(name) / "data"
    shutil.copytree(demo_data_dir, data_dir)
    return data_dir


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory, demo_data_dir: Path,
                models_cache: Path) -> Iterator[Server]:
    srv = start_server(_copy(tmp_path_factory, demo_data_dir, "http"),
                       edgekb_env(models_cache), *HTTP_FAST)
    yield srv
    srv.stop()


async def uncut(srv: Server) -> list[dict[str, Any]]:
    """The demo question in a new session, over SSE without cuts: the reference answer."""
    async with aiohttp.ClientSession(headers=srv.headers) as http, http.post(
            srv.url + "api/ask", json={"text": DEMO_QUESTION}, headers=SSE) as response:
        frames = request_events(await read_events(response, timeout=ANSWER_TIMEOUT_S))
    assert frames[-1]["type"] == "done", frames[-1]
    assert answer_of(frames)
    return frames


@pytest.fixture(scope="module")
def reference(http_server: Server) -> list[dict[str, Any]]:
    return asyncio.run(uncut(http_server))


def same_answer(frames: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1)), "lost or repeated"
    assert answer_of(frames) == answer_of(expected), "the reassembled answer differs"
    ours = [{k: f[k] for k in ("doc", "where", "snippet")} for f in frames
            if f["type"] == "source"]
    assert ours == [{k: f[k] for k in ("doc", "where", "snippet")} for f in expected
                    if f["type"] == "source"]
    done, want = frames[-1], expected[-1]
    assert done["type"] == "done" and (done["chars"], done["sha256"]) == (want["chars"],
                                                                           want["sha256"])


async def test_curl_streams_an_answer_as_it_is_written(http_server: Server,
                                                       reference: list[dict[str, Any]]) -> None:
    process = subprocess.Popen(
        ["curl", "-sN", "--max-time", str(ANSWER_TIMEOUT_S), "-X", "POST",
         http_server.url + "api/ask", "-H", "Accept: text/event-stream",
         "-H", f"Authorization: Bearer {http_server.token}",
         "-H", "Content-Type: application/json", "-d", json.dumps({"text": DEMO_QUESTION})],
        stdout=subprocess.PIPE)
    parser = SseParser()
    arrivals: dict[str, float] = {}

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:  # ends with curl (bounded by --max-time)
            for event in parser.feed(line):
                arrivals.setdefault(event.event, time.monotonic())

    with process:
        try:
            await asyncio.to_thread(read)
        finally:
            process.kill()
    assert parser.events[0].event == "request"
    same_answer(request_events(parser), reference)
    # Streamed, not buffered to the end: the request event came well before the answer's end.
    assert arrivals["done"] - arrivals["request"] > 0.3, arrivals


async def through_cuts(http: aiohttp.ClientSession, proxy: FaultProxy, session: str,
                       request_id: str, parser: SseParser, stop_at_cuts: int | None = None
                       ) -> None:
    """Follow one request through the proxy, resuming with Last-Event-ID after every cut, to
    its end (or until the proxy made ``stop_at_cuts`` cuts)."""
    url = f"http://127.0.0.1:{proxy.port}/api/sessions/{session}/requests/{request_id}/events"
    for _ in range(MAX_ATTEMPTS):
        frames = request_events(parser)
        if frames and frames[-1]["type"] in ("done", "error"):
            return
        if stop_at_cuts is not None and proxy.cuts >= stop_at_cuts:
            return
        try:
            async with http.get(url, headers={**SSE, "Last-Event-ID":
                                              parser.last_event_id or "0"}) as response:
                if response.status == 204:
                    return
                await read_events(response, parser, timeout=ANSWER_TIMEOUT_S)
        except aiohttp.ClientError:  # cut before the headers were whole
            continue
    raise AssertionError(f"no end after {MAX_ATTEMPTS} connections")


def arm_cuts(proxy: FaultProxy, budgets: list[int]) -> None:
    """Cut after each of ``budgets`` server->client bytes in turn (a random point in the
    stream: the response headers and the first event take about 400 bytes); each cut arms
    the next, so a connection the client retries by itself is cut too."""
    cut = proxy.cut

    def cut_and_arm() -> int:
        links = cut()
        proxy.cut_after(budgets.pop() if budgets else None)
        return links

    proxy.cut = cut_and_arm  # type: ignore[method-assign]
    proxy.cut_after(budgets.pop() if budgets else None)


async def ask_id(srv: Server, session: str | None, request_id: str) -> str:
    """Ask without reading the answer (it goes on, stored); returns the session."""
    body = {"text": DEMO_QUESTION, "id": request_id, **({"session": session} if session else {})}
    async with aiohttp.ClientSession(headers=srv.headers) as http, http.post(
            srv.url + "api/ask", json=body, headers=SSE) as response:
        assert response.status == 200, await response.text()
        return response.headers["Edgekb-Session"]


async def test_an_sse_stream_cut_at_fifty_points_reassembles_the_answer_across_a_restart(
        tmp_path_factory: pytest.TempPathFactory, demo_data_dir: Path,
        models_cache: Path) -> None:
    data_dir = _copy(tmp_path_factory, demo_data_dir, "restart")
    env = edgekb_env(models_cache)
    rng = random.Random(20261202)
    srv = start_server(data_dir, env, *HTTP_FAST)
    try:
        expected = await uncut(srv)
        proxy = await FaultProxy(port_of(srv)).start()
        budgets = [rng.randint(380, 900) for _ in range(CUTS // 2)]
        arm_cuts(proxy, budgets)
        parser = SseParser()
        try:
            session = await ask_id(srv, None, "cut")
            # Half the cuts before the restart.
            async with aiohttp.ClientSession(headers=srv.headers) as http:
                await through_cuts(http, proxy, session, "cut", parser, CUTS // 2)
            before_restart = proxy.cuts
        finally:
            await proxy.close()
        # Let the answer end (the JSON form waits for it), then restart the server.
        async with aiohttp.ClientSession(headers=srv.headers) as http, http.get(
                f"{srv.url}api/sessions/{session}/requests/cut/events",
                timeout=aiohttp.ClientTimeout(total=ANSWER_TIMEOUT_S)) as response:
            assert (await response.json())["finish"] in ("stop", "length")
    finally:
        srv.stop()
    assert before_restart >= 1
    srv = start_server(data_dir, env, *HTTP_FAST)
    try:
        proxy = await FaultProxy(port_of(srv)).start()
        budgets = [rng.randint(380, 900) for _ in range(CUTS - before_restart)]
        arm_cuts(proxy, budgets)
        try:
            async with aiohttp.ClientSession(headers=srv.headers) as http:
                await through_cuts(http, proxy, session, "cut", parser)
                same_answer(request_events(parser), expected)
                # Cuts left over: a new question on the restarted server, cut the same way.
                for n in range(20):
                    if not budgets and proxy.cut_budget is None:
                        break
                    more = SseParser()  # a new session: the same prompt, the same answer
                    fresh = await ask_id(srv, None, f"more-{n}")
                    await through_cuts(http, proxy, fresh, f"more-{n}", more)
                    same_answer(request_events(more), expected)
            made = proxy.cuts
        finally:
            await proxy.close()
    finally:
        srv.stop()
    assert made + before_restart >= CUTS, (made, before_restart)


async def test_a_request_asked_over_websocket_is_resumed_over_sse(
        http_server: Server, reference: list[dict[str, Any]]) -> None:
    async with aiohttp.ClientSession(headers=http_server.headers) as http:
        async with http.ws_connect(http_server.ws_url, protocols=("edgekb.v2",)) as ws:
            welcome = json.loads((await ws.receive(timeout=30)).data)
            await ws.send_json({"type": "ask", "id": "w1", "text": DEMO_QUESTION})
            seen = []
            async for message in ws:  # bounded: the answer ends, or the first deltas come
                frame = json.loads(message.data)
                if frame.get("id") == "w1":
                    seen.append(frame)
                if sum(f["type"] == "delta" for f in seen) >= 3 or frame["type"] == "done":
                    break
        url = f"{http_server.url}api/sessions/{welcome['session']}/requests/w1/events"
        async with http.get(url, headers={**SSE, "Last-Event-ID": str(seen[-1]["seq"])}) as r:
            rest = request_events(await read_events(r, timeout=ANSWER_TIMEOUT_S))
    same_answer(seen + rest, reference)


@pytest.fixture(scope="module")
def user_token(http_server: Server, models_cache: Path) -> str:
    """A plain user's token, made as an operator makes one for a tool (`edgekb token issue`)."""
    return issue_token(http_server.data_dir, edgekb_env(models_cache), role="user", sub="hmi")


def openai_client(srv: Server, token: str) -> openai.AsyncOpenAI:
    """The official client; its api_key carries our token (Authorization: Bearer)."""
    return openai.AsyncOpenAI(base_url=srv.url + "v1", api_key=token, max_retries=0,
                              timeout=ANSWER_TIMEOUT_S)


async def test_the_openai_client_streams_a_chat_completion_with_its_sources(
        http_server: Server, reference: list[dict[str, Any]], user_token: str) -> None:
    async with openai_client(http_server, user_token) as client:
        stream = await client.chat.completions.create(
            model="gemma3-270m", stream=True,
            messages=[{"role": "user", "content": DEMO_QUESTION}])
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer_of(reference), "not the answer the native routes give"
    sources = [s for c in chunks for s in c.model_extra.get("sources", [])]
    assert [s["doc"] for s in sources] == [f["doc"] for f in reference if f["type"] == "source"]
    assert sources and all(s["title"] and s["snippet"] for s in sources)
    cited = [int(n) for n in re.findall(r"\[(\d+)\]", text)]
    assert all(1 <= n <= len(sources) for n in cited), "a citation names no source"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


async def test_the_openai_client_resumes_a_background_response_after_a_cut(
        http_server: Server, reference: list[dict[str, Any]], user_token: str) -> None:
    async with openai_client(http_server, user_token) as client:
        created = await client.responses.create(model="gemma3-270m", input=DEMO_QUESTION,
                                                background=True)
        stream = await client.responses.retrieve(created.id, stream=True)
        first = []
        async for event in stream:
            first.append(event)
            deltas = sum(e.type == "response.output_text.delta" for e in first)
            if deltas >= 3 or event.type in ("response.completed", "response.incomplete"):
                break
        await stream.close()  # the cut
        after = first[-1].sequence_number
        rest = [e async for e in await client.responses.retrieve(
            created.id, stream=True, starting_after=after)]
        final = await client.responses.retrieve(created.id)
    text = "".join(e.delta for e in first + rest if e.type == "response.output_text.delta")
    assert text == answer_of(reference) == final.output_text
    assert all(e.sequence_number > after for e in rest)
    assert rest[-1].type in ("response.completed", "response.incomplete")


async def scrape(http: aiohttp.ClientSession, srv: Server) -> dict[tuple[str, str], float]:
    async with http.get(srv.url + "metrics") as response:
        assert response.status == 200
        families = text_string_to_metric_families(await response.text())
        return {(s.name, json.dumps(s.labels, sort_keys=True)): s.value
                for family in families for s in family.samples}


async def test_metrics_parse_and_move_and_readiness_holds_on_the_real_server(
        http_server: Server) -> None:
    async with aiohttp.ClientSession(headers=http_server.headers) as http:
        before = await scrape(http, http_server)
        async with http.ws_connect(http_server.ws_url, protocols=("edgekb.v2",)) as ws:
            await ws.receive(timeout=30)
            await ws.send_json({"type": "ask", "id": "m", "text": DEMO_QUESTION})
            await collect(ws, "m", timeout=ANSWER_TIMEOUT_S)
        after = await scrape(http, http_server)
        async with http.get(http_server.url + "readyz") as response:
            ready = await response.json()
    stop = ("edgekb_requests_total", '{"outcome": "stop"}')
    length = ("edgekb_requests_total", '{"outcome": "length"}')
    assert after.get(stop, 0) + after.get(length, 0) == \
        before.get(stop, 0) + before.get(length, 0) + 1
    ttft = ("edgekb_time_to_first_token_seconds_count", "{}")
    assert after[ttft] == before[ttft] + 1
    assert after[("edgekb_generation_tokens_per_second_count", "{}")] >= 1
    assert after[("edgekb_index_vectors", "{}")] > 0 and after[("edgekb_documents", "{}")] >= 1
    assert after[("process_resident_memory_bytes", "{}")] > 100 * 2**20
    assert ready == {"status": "ready", "checks": {"models": "ok", "index": "ok",
                                                   "store": "ok", "disk": "ok",
                                                   "server": "ok"}}
