"""The answer engine through the real server: fair queue, stages, cancel, sessions' context,
prefix reuse, determinism, and the prompt's fit to the context window."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import (
    DEMO_QUESTION,
    Server,
    answer_text,
    collect,
    edgekb_env,
    receive_json,
    start_server,
    until,
)

FOLLOW_UP = "What should I do if E-204 comes back after the restart?"


async def connect(session: aiohttp.ClientSession, server: Server,
                  session_id: str | None = None) -> tuple[aiohttp.ClientWebSocketResponse, str]:
    url = server.ws_url + (f"?session={session_id}" if session_id else "")
    ws = await session.ws_connect(url, protocols=("edgekb.v2",))
    welcome = await receive_json(ws)
    return ws, welcome["session"]


async def ask(ws: aiohttp.ClientWebSocketResponse, request_id: str,
              text: str) -> list[dict[str, Any]]:
    await ws.send_json({"type": "ask", "id": request_id, "text": text})
    return await collect(ws, request_id)


@pytest.fixture(scope="module")
def short_server(demo_data_dir: Path, models_cache: Path, tmp_path_factory) -> Server:
    """Short answers, one answer at a time and a queue of two, so waiting and refusal are
    quick to reach."""
    import shutil

    data_dir = tmp_path_factory.mktemp("queue") / "data"
    shutil.copytree(demo_data_dir, data_dir, ignore=shutil.ignore_patterns("edgekb.lock"))
    srv = start_server(data_dir, edgekb_env(models_cache), "--set", "generation.max_tokens=24",
                       "--set", "queue.max_waiting=2", "--set", "queue.max_per_user=5",
                       "--set", "generation.slots=1")
    yield srv
    srv.stop()


async def test_stages_arrive_in_order_with_reading_progress(server: Server) -> None:
    async with aiohttp.ClientSession(headers=server.headers) as http:
        ws, _ = await connect(http, server)
        events = await ask(ws, "stages", DEMO_QUESTION)
        await ws.close()
    kinds = [e["type"] if e["type"] != "status" else e["stage"] for e in events]
    order = ["queued", "retrieving", "source", "reading", "generating", "delta", "done"]
    firsts = [kinds.index(k) for k in order]
    assert firsts == sorted(firsts), kinds
    progress = [e["progress"] for e in events if e.get("stage") == "reading"]
    assert progress == sorted(progress) and all(0 <= p < 1 for p in progress)
    timings = events[-1]["timings"]
    assert timings["retrieval_ms"] >= 0 and timings["prompt_ms"] > 0
    assert timings["ttft_ms"] >= timings["prompt_ms"] and timings["tokens_per_s"] > 0
    assert events[-1]["usage"]["prompt_tokens"] > 100


async def test_three_clients_all_told_their_place_and_served_in_turn(
        short_server: Server) -> None:
    async with aiohttp.ClientSession(headers=short_server.headers) as http:
        sockets = [(await connect(http, short_server))[0] for _ in range(3)]
        for i, ws in enumerate(sockets):
            await ws.send_json({"type": "ask", "id": f"c{i}", "text": DEMO_QUESTION})
        results = await asyncio.gather(*(collect(ws, f"c{i}") for i, ws in enumerate(sockets)))
        for ws in sockets:
            await ws.close()
    firsts = [events[0] for events in results]
    assert all(e["type"] == "queued" for e in firsts)
    assert sorted(e["position"] for e in firsts) == [0, 1, 2]
    for events in results:
        positions = [e["position"] for e in events if e["type"] == "queued"]
        assert positions == sorted(positions, reverse=True) and positions[-1] == 0
        assert events[-1]["type"] == "done"


async def test_full_queue_answers_busy_with_retry_after(short_server: Server) -> None:
    async with aiohttp.ClientSession(headers=short_server.headers) as http:
        ws, _ = await connect(http, short_server)
        for i in range(4):  # one runs, two wait, the fourth finds the queue full
            await ws.send_json({"type": "ask", "id": f"b{i}", "text": DEMO_QUESTION})
        busy = await collect(ws, "b3")
        assert busy[-1]["type"] == "error" and busy[-1]["code"] == "busy"
        assert busy[-1]["retry_after"] > 0
        for i in range(3):
            assert (await collect(ws, f"b{i}"))[-1]["type"] == "done"
        await ws.close()


async def test_cancel_stops_generation_and_the_next_request_starts(server: Server) -> None:
    async with aiohttp.ClientSession(headers=server.headers) as http:
        ws, _ = await connect(http, server)
        await ws.send_json({"type": "ask", "id": "long", "text": DEMO_QUESTION})
        await ws.send_json({"type": "ask", "id": "next", "text": "How do I verify zero energy?"})
        seen = await until(ws, "long", "delta")
        assert seen[-1]["type"] == "delta", seen[-1]
        await ws.send_json({"type": "cancel", "id": "long"})
        rest = await collect(ws, "long")
        done = rest[-1]
        assert done["type"] == "done" and done["finish"] == "cancelled"
        # Stopped within a token or two of the cancel, far below max_tokens.
        assert done["usage"]["completion_tokens"] < 40
        assert done["chars"] == len(answer_text(seen + rest))
        nxt = await collect(ws, "next")
        assert nxt[-1]["type"] == "done" and nxt[-1]["finish"] != "cancelled"
        await ws.close()


async def test_cancel_while_queued_leaves_the_queue(short_server: Server) -> None:
    async with aiohttp.ClientSession(headers=short_server.headers) as http:
        ws, _ = await connect(http, short_server)
        await ws.send_json({"type": "ask", "id": "first", "text": DEMO_QUESTION})
        await ws.send_json({"type": "ask", "id": "waiting", "text": DEMO_QUESTION})
        await ws.send_json({"type": "cancel", "id": "waiting"})
        waited = await collect(ws, "waiting")
        assert waited[-1]["type"] == "done" and waited[-1]["finish"] == "cancelled"
        assert not any(e["type"] in ("source", "delta") for e in waited)
        assert (await collect(ws, "first"))[-1]["finish"] != "cancelled"
        await ws.close()


async def until_llm_idle(http: aiohttp.ClientSession, server: Server) -> None:
    for _ in range(200):  # bounded: 20 s
        async with http.get(server.url + "api/status") as response:
            status = await response.json()
        if status["llm"] == "idle" and status["heads_waiting"] == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the LLM never became idle: {status}")


async def test_follow_up_uses_earlier_turns_and_reuses_the_cached_prefix(
        short_server: Server) -> None:
    server = short_server
    async with aiohttp.ClientSession(headers=server.headers) as http:
        ws_a, session_a = await connect(http, server)
        first = await ask(ws_a, "a1", DEMO_QUESTION)
        ws_b, _ = await connect(http, server)
        await ask(ws_b, "b1", "How much sag should the conveyor return belt have?")
        # Another session ran in between, then both users read their answers: in that idle
        # time the server pre-reads each session's next prompt head.
        await until_llm_idle(http, server)
        follow = await ask(ws_a, "a2", FOLLOW_UP)
        # The same question in a new session shares only the instruction with what was read.
        ws_c, _ = await connect(http, server)
        control = await ask(ws_c, "c1", FOLLOW_UP)
        for ws in (ws_a, ws_b, ws_c):
            await ws.close()
    assert first[-1]["type"] == follow[-1]["type"] == control[-1]["type"] == "done"
    usage = follow[-1]["usage"]
    # The prompt now holds the first turn...
    assert usage["prompt_tokens"] > control[-1]["usage"]["prompt_tokens"] + \
        first[-1]["usage"]["completion_tokens"]
    # ...and beyond the instruction every prompt shares, that turn (its answer included) was
    # not read again: it was pre-read while the LLM was idle.
    assert usage["cached_prompt_tokens"] >= (control[-1]["usage"]["cached_prompt_tokens"]
                                             + first[-1]["usage"]["completion_tokens"])
    # The follow-up kept the first answer's sources in front, so the first prompt was not
    # read again up to its question: a new source of the follow-up comes after the earlier
    # ones, before the turns (at most the question, its chat markup and one 16-token block).
    assert usage["cached_prompt_tokens"] >= first[-1]["usage"]["prompt_tokens"] - 64
    first_docs = [e["doc"] for e in first if e["type"] == "source"]
    assert [e["doc"] for e in follow if e["type"] == "source"][: len(first_docs)] == first_docs


async def test_same_question_same_answer_in_deterministic_mode(short_server: Server) -> None:
    server = short_server
    texts = []
    async with aiohttp.ClientSession(headers=server.headers) as http:
        for i in range(2):
            ws, _ = await connect(http, server)
            texts.append(answer_text(await ask(ws, f"det{i}", DEMO_QUESTION)))
            await ws.close()
    assert texts[0] == texts[1] and texts[0].strip()
