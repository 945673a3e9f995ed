"""A question over the real WebSocket to the real server, with the real default models."""

from __future__ import annotations

import json

import aiohttp

from conftest import (
    DEMO_QUESTION,
    Server,
    answer_text,
    collect,
    edgekb_env,
    receive_json,
    run_edgekb,
    sources_of,
)


async def test_demo_question_streams_sources_then_answer(server: Server) -> None:
    async with aiohttp.ClientSession(headers=server.headers) as session, \
            session.ws_connect(server.ws_url, protocols=("edgekb.v2",)) as ws:
        assert ws.protocol == "edgekb.v2"
        welcome = await receive_json(ws)
        assert welcome["type"] == "welcome" and welcome["protocol"] == "edgekb.v2"
        await ws.send_json({"type": "ask", "id": "r1", "text": DEMO_QUESTION})
        events = await collect(ws, "r1")

    kinds = [e["type"] for e in events]
    assert kinds[-1] == "done", events[-1]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    sources = sources_of(events)
    assert sources[0]["doc"] == "pump-manual.md"
    assert "Overpressure" in sources[0]["where"]
    # Neighbouring chunks of one section come as one source, not as overlapping halves.
    places = [(s["doc"], s["where"]) for s in sources]
    assert len(places) == len(set(places))
    first_delta = kinds.index("delta")
    assert kinds.index("source") < first_delta
    deltas = "".join(e["text"] for e in events if e["type"] == "delta")
    done = events[-1]
    assert deltas.strip() and deltas == answer_text(events) and not deltas[0].isspace()
    assert done["usage"]["completion_tokens"] > 0
    assert done["timings"]["ttft_ms"] > 0 and done["timings"]["tokens_per_s"] > 0


async def test_malformed_messages_get_typed_errors_and_connection_lives(server: Server) -> None:
    cases = [
        ("this is not json", "bad_json"),
        (json.dumps([1, 2]), "bad_json"),
        (json.dumps({"type": "shout", "id": "x"}), "unknown_type"),
        (json.dumps({"type": "ask", "id": "a1"}), "invalid_field"),
        (json.dumps({"type": "ask", "id": "bad id!", "text": "hi"}), "invalid_field"),
        (json.dumps({"type": "cancel", "id": "nothing-running"}), "unknown_request"),
        (json.dumps({"type": "ask", "id": "big", "text": "x" * 70_000}), "too_large"),
    ]
    async with aiohttp.ClientSession(headers=server.headers) as session, \
            session.ws_connect(server.ws_url, protocols=("edgekb.v2",)) as ws:
        await receive_json(ws)  # welcome
        for frame, code in cases:
            await ws.send_str(frame)
            reply = await receive_json(ws)
            assert reply["type"] == "error" and reply["code"] == code, (frame[:40], reply)
            assert reply["message"]
        await ws.send_json({"type": "ping"})
        assert (await receive_json(ws))["type"] == "pong"
        # Still able to answer after all that.
        await ws.send_json({"type": "ask", "id": "ok", "text": "How do I verify zero energy?"})
        events = await collect(ws, "ok")
        assert events[-1]["type"] == "done"


def test_cli_ask_prints_sources_then_the_streamed_answer(server: Server, models_cache) -> None:
    env = edgekb_env(models_cache, EDGEKB_TOKEN=server.token)  # as a script would pass it
    result = run_edgekb(["ask", DEMO_QUESTION, "--url", server.ws_url], env, check=True)
    first_line = result.stdout.splitlines()[0]
    assert first_line.startswith("[1] ") and "pump-manual.md" in first_line
    assert len(result.stdout.strip().splitlines()) > 2

    as_json = run_edgekb(["ask", DEMO_QUESTION, "--url", server.ws_url, "--json", "--token",
                          server.token], edgekb_env(models_cache), check=True)
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert events[0]["type"] == "welcome" and events[-1]["type"] == "done"
    assert answer_text(events)


def test_page_is_served(server: Server) -> None:
    import urllib.request

    with urllib.request.urlopen(server.url, timeout=10) as response:
        page = response.read().decode()
    assert "<html" in page.lower() and "app.js" in page
