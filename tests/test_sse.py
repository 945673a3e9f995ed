"""Native SSE in-process, on the scripted answer engine: framing, the first event and headers,
resume by Last-Event-ID and ?after= (also through a proxy that cuts at random points), the
JSON form, typed refusals, heartbeats, WebSocket <-> SSE on one log, shutdown and restart.

The real-model proofs (curl, cuts over a real answer, a restart) are in test_http_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import aiohttp
import pytest
from core_helpers import Core, start_core, text_of, until
from faultproxy import FaultProxy
from sse_client import SseParser, answer_of, read_events, request_events

from edgekb import events

SSE = {"Accept": "text/event-stream"}
SCRIPT = ["Close", " the", " discharge", " valve", "."]


@pytest.fixture
async def core(aiohttp_client, tmp_path: Path) -> Core:  # type: ignore[no-untyped-def]
    return await start_core(aiohttp_client, tmp_path / "data", **{
        "sessions.grace_s": 5, "storage.min_free_mb": 0, "http.heartbeat_s": 0.2})


def events_url(session: str, request_id: str) -> str:
    return f"/api/sessions/{session}/requests/{request_id}/events"


async def ask_stream(core: Core, **body: object) -> aiohttp.ClientResponse:
    response = await core.client.post("/api/ask", json=body, headers=SSE)
    assert response.status == 200, await response.text()
    return response


async def test_an_answer_streams_its_events_with_seq_as_id_and_type_as_event(core: Core) -> None:
    response = await ask_stream(core, text="How do I reset the pump?")
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    session, request_id = response.headers["Edgekb-Session"], response.headers["Edgekb-Request"]
    parser = await read_events(response)
    first = parser.events[0]
    assert first.event == "request" and first.id is None
    assert first.json == {"type": "request", "session": session, "id": request_id, "after": 0}
    frames = request_events(parser)
    assert [int(e.id) for e in parser.events[1:]] == [f["seq"] for f in frames] \
        == list(range(1, len(frames) + 1))
    assert [e.event for e in parser.events[1:]] == [f["type"] for f in frames]
    assert frames[0]["type"] == "queued" and frames[-1]["type"] == "done"
    text = answer_of(frames)
    assert text == "".join(SCRIPT)
    assert frames[-1]["sha256"] == events.text_digest(text)


async def test_last_event_id_or_after_replays_exactly_the_missing_events(core: Core) -> None:
    core.engine.default.hold_after = 2
    response = await ask_stream(core, text="held", id="r1")
    session = response.headers["Edgekb-Session"]
    parser = SseParser()
    for _ in range(20):  # up to the hold: "Close the"
        await read_events(response, parser, until="delta")
        if answer_of(request_events(parser)) == "Close the":
            break
    response.close()  # the client drops; the answer goes on
    seen = request_events(parser)
    resumed = await core.client.get(events_url(session, "r1"),
                                    headers={**SSE, "Last-Event-ID": parser.last_event_id})
    core.engine.gate.set()
    rest_parser = await read_events(resumed)
    assert rest_parser.events[0].json["after"] == seen[-1]["seq"]
    rest = request_events(rest_parser)
    assert rest[0]["seq"] == seen[-1]["seq"] + 1, "an event was lost or sent twice"
    assert answer_of(seen + rest) == "".join(SCRIPT)
    # ?after= gives the same tail as the header (a client without EventSource).
    again = await read_events(await core.client.get(
        events_url(session, "r1") + f"?after={seen[-1]['seq']}", headers=SSE))
    assert request_events(again) == rest


async def test_a_finished_request_answers_204_so_event_source_stops(core: Core) -> None:
    response = await ask_stream(core, text="q", id="done1")
    session = response.headers["Edgekb-Session"]
    frames = request_events(await read_events(response))
    last = frames[-1]["seq"]
    end = await core.client.get(events_url(session, "done1"),
                                headers={**SSE, "Last-Event-ID": str(last)})
    assert end.status == 204
    replay = await read_events(await core.client.get(
        events_url(session, "done1"), headers={**SSE, "Last-Event-ID": str(last - 2)}))
    assert request_events(replay) == frames[-2:]


async def test_without_event_stream_accept_the_answer_is_one_json_document(core: Core) -> None:
    response = await core.client.post("/api/ask", json={"text": "q", "id": "j1"})
    assert response.status == 200
    body = await response.json()
    assert body["session"] == response.headers["Edgekb-Session"] and body["id"] == "j1"
    assert body["text"] == "".join(SCRIPT) and body["finish"] == "stop"
    assert body["chars"] == len(body["text"]) and body["sha256"] == events.text_digest(body["text"])
    assert [s["n"] for s in body["sources"]] == [1] and body["sources"][0]["doc"]
    # The same route for an ended request, as a document too.
    again = await core.client.get(events_url(body["session"], "j1"))
    assert (await again.json())["text"] == body["text"]


async def test_refusals_and_bad_requests_are_typed_json_errors_before_any_stream(
        aiohttp_client, tmp_path: Path) -> None:
    core = await start_core(aiohttp_client, tmp_path / "data", **{
        "queue.max_waiting": 1, "storage.min_free_mb": 0})
    core.engine.default.hold_after = 1
    client = core.client
    running = await ask_stream(core, text="first", id="a")
    session = running.headers["Edgekb-Session"]
    await until(lambda: core.engine.started == ["first"])
    waiting = await ask_stream(core, text="second", id="b", session=session)
    await until(lambda: core.conversations.queue.waiting == 1)

    async def refused(body: object, status: int, code: str) -> dict:  # type: ignore[type-arg]
        response = await client.post("/api/ask", json=body, headers=SSE)
        assert response.status == status, await response.text()
        assert response.content_type == "application/json"
        error = (await response.json())["error"]
        assert error["code"] == code, error
        return error

    busy = await refused({"text": "third", "session": session}, 503, "busy")
    assert busy["retry_after"] > 0
    await refused({"text": "again", "id": "a", "session": session}, 409, "id_reuse")
    await refused({"text": "x" * 4001}, 400, "invalid_field")
    assert (await refused({"text": "q", "colour": 1}, 400, "invalid_field"))["field"] == "colour"
    await refused({"text": "q", "options": {"retrieve": False}}, 400, "invalid_field")
    bad = await client.post("/api/ask", data=b"{not json", headers=SSE)
    assert bad.status == 400 and (await bad.json())["error"]["code"] == "bad_json"
    unknown = await client.get(events_url(session, "nope"), headers=SSE)
    assert unknown.status == 404 and (await unknown.json())["error"]["code"] == "unknown_request"
    bad_cursor = await client.get(events_url(session, "a"), headers={**SSE,
                                                                      "Last-Event-ID": "-3"})
    assert bad_cursor.status == 400
    # Another user's session is nobody's to read: the core says so before a transport can.
    assert await core.conversations.state(session, "someone-else", "a") is None
    core.engine.gate.set()
    for response in (running, waiting):
        assert request_events(await read_events(response))[-1]["type"] == "done"
    rows = await core.conversations.history(session, None, 10)
    assert sorted(t.request_id for t in rows[0]) == ["a", "b"], "a refused question left a trace"


async def test_comments_keep_a_quiet_stream_alive_while_the_answer_waits(core: Core) -> None:
    core.engine.default.hold_after = 0  # nothing after the sources until the gate opens
    response = await ask_stream(core, text="held")
    parser = SseParser()
    await read_events(response, parser, until="status")
    reader = asyncio.ensure_future(read_events(response, parser, timeout=5))
    await asyncio.sleep(1.0)
    quiet_comments = len(parser.comments)
    core.engine.gate.set()
    await reader
    assert quiet_comments >= 3, parser.comments  # heartbeat_s 0.2 over ~1 s of silence
    assert set(parser.comments) == {"keep-alive"}
    assert answer_of(request_events(parser)) == "".join(SCRIPT)


async def test_a_request_started_on_websocket_resumes_over_sse_and_back(core: Core) -> None:
    core.engine.default.hold_after = 2
    peer = await core.connect()
    await peer.send({"type": "ask", "id": "w", "text": "held"})
    seen = []
    for _ in range(20):
        seen.append(await peer.next_of("w"))
        if text_of(seen) == "Close the":
            break
    await peer.close()
    over_sse = await core.client.get(events_url(peer.session, "w"),
                                     headers={**SSE, "Last-Event-ID": str(seen[-1]["seq"])})
    parser = SseParser()
    await read_events(over_sse, parser, until="request")  # the stream is open
    core.engine.gate.set()
    await read_events(over_sse, parser)
    rest = request_events(parser)
    assert rest[0]["seq"] == seen[-1]["seq"] + 1
    assert text_of(seen + rest) == "".join(SCRIPT)
    # The other way: an SSE request resumed over WebSocket gets the same frames.
    response = await ask_stream(core, text="plain", id="s", session=peer.session)
    sse_frames = request_events(await read_events(response))
    back = await core.connect(peer.session)
    await back.send({"type": "resume", "id": "s", "after": 2})
    assert await back.until_end("s") == sse_frames[2:]


async def test_fifty_random_cuts_resumed_by_last_event_id_reassemble_the_stream(
        core: Core) -> None:
    core.engine.default.pieces = [f"word{i} " for i in range(600)]
    uncut_response = await ask_stream(core, text="long", id="uncut")
    session = uncut_response.headers["Edgekb-Session"]
    uncut = request_events(await read_events(uncut_response))
    proxy = await FaultProxy(core.client.server.port).start()
    arm_random_cuts(proxy, 50, random.Random(11))
    parser = SseParser()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{proxy.port}",
                                         headers=core.client.session.headers) as http:
            for attempt in range(400):
                frames = request_events(parser)
                if frames and frames[-1]["type"] == "done":
                    break
                if attempt == 0:  # the question itself, cut like any other stream
                    call = http.post("/api/ask", json={"text": "long", "id": "cut",
                                                       "session": session}, headers=SSE)
                else:
                    call = http.get(events_url(session, "cut"), headers={
                        **SSE, "Last-Event-ID": parser.last_event_id or "0"})
                try:
                    async with call as response:
                        await read_events(response, parser)
                except aiohttp.ClientError:  # cut before the headers were complete
                    continue
        made = proxy.cuts
    finally:
        await proxy.close()
    assert made == 50
    frames = request_events(parser)
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1)), "lost or repeated"
    strip = [{k: v for k, v in f.items() if k not in ("id", "timings")} for f in frames]
    assert strip == [{k: v for k, v in f.items() if k not in ("id", "timings")} for f in uncut]


def arm_random_cuts(proxy: FaultProxy, count: int, rng: random.Random) -> None:
    """Cut the stream after a random 1-1500 bytes, ``count`` times: each cut arms the next,
    so a connection the client retries by itself (aiohttp retries a GET once) is cut too."""
    budgets = [rng.randint(1, 1500) for _ in range(count)]
    cut = proxy.cut

    def cut_and_arm() -> int:
        links = cut()
        proxy.cut_after(budgets.pop() if budgets else None)
        return links

    proxy.cut = cut_and_arm  # type: ignore[method-assign]
    proxy.cut_after(budgets.pop())


async def test_shutdown_ends_streams_and_the_restarted_server_resumes_them(
        aiohttp_client, tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = await start_core(aiohttp_client, data, **{"storage.min_free_mb": 0})
    first.engine.default.hold_after = 2
    response = await ask_stream(first, text="held", id="r")
    session = response.headers["Edgekb-Session"]
    parser = SseParser()
    for _ in range(20):
        await read_events(response, parser, until="delta")
        if answer_of(request_events(parser)) == "Close the":
            break
    reader = asyncio.ensure_future(read_events(response, parser, timeout=10))
    await first.client.close()  # graceful shutdown: the stream ends, the answer is interrupted
    await reader
    seen = request_events(parser)
    assert seen[-1]["type"] == "delta", "the stream should end before the answer is cut off"
    second = await start_core(aiohttp_client, data, **{"storage.min_free_mb": 0})
    rest = request_events(await read_events(await second.client.get(
        events_url(session, "r"), headers={**SSE, "Last-Event-ID": parser.last_event_id})))
    assert rest[0]["seq"] == seen[-1]["seq"] + 1
    assert rest[-1]["type"] == "error" and rest[-1]["code"] == "interrupted"
    assert rest[-1]["chars"] == len(answer_of(seen + rest))


async def test_options_retrieval_false_asks_the_model_alone(core: Core) -> None:
    frames = request_events(await read_events(await ask_stream(
        core, text="tell me a joke", options={"retrieval": False})))
    assert not [f for f in frames if f["type"] == "source"]
    assert core.engine.options["tell me a joke"].retrieval is False
    await read_events(await ask_stream(core, text="with sources"))
    assert core.engine.options["with sources"].retrieval is True


async def test_cancel_and_turns_over_http(core: Core) -> None:
    core.engine.default.hold_after = 1
    response = await ask_stream(core, text="held", id="c")
    session = response.headers["Edgekb-Session"]
    await until(lambda: "held" in core.engine.started)
    cancel = await core.client.post(f"/api/sessions/{session}/requests/c/cancel")
    assert cancel.status == 202
    frames = request_events(await read_events(response))
    assert frames[-1]["type"] == "done" and frames[-1]["finish"] == "cancelled"
    turns = await (await core.client.get(f"/api/sessions/{session}/turns")).json()
    assert [(t["id"], t["finish"]) for t in turns["turns"]] == [("c", "cancelled")]
    missing = await core.client.get("/api/sessions/NoSuchSession1/turns")
    assert missing.status == 404 and (await missing.json())["error"]["code"] == "not_found"


async def test_every_frame_of_a_stream_is_the_websocket_frame(core: Core) -> None:
    """One log serves both transports: the data lines are the very frames a peer gets."""
    response = await ask_stream(core, text="q", id="same")
    session = response.headers["Edgekb-Session"]
    sse = [e.data for e in (await read_events(response)).events if e.id is not None]
    peer = await core.connect(session)
    await peer.send({"type": "resume", "id": "same", "after": 0})
    ws = [json.dumps(f, ensure_ascii=False, separators=(",", ":"))
          for f in await peer.until_end("same")]
    assert sse == ws
