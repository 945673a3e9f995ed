"""The HTTP transports go through the same security layer as the WebSocket, in-process on the
scripted answer engine: a credential on every answer route (the openai client's api_key is
the token), /healthz open, /readyz signed in, /metrics from loopback only by default; a plain
user may ask and cancel but not see another user's requests; one question budget per user
across transports; every question in the audit trail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from core_helpers import Core, start_core
from securelib import audit_lines, wait_for_audit
from sse_client import answer_of, read_events, request_events

from edgekb import keys
from edgekb.config import load_settings
from edgekb.protocol import PROTOCOL
from edgekb.tokens import token_authority

SSE = {"Accept": "text/event-stream"}
SCRIPT = "Close the discharge valve."


def token_of(core: Core, user: str, role: str) -> str:
    settings = load_settings(env={}, overrides={"data_dir": core.data_dir})
    return token_authority(settings).issue(user, role, 3600)[0]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def openai_client(core: Core, api_key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{core.client.server.port}/v1",
                              api_key=api_key, max_retries=0, timeout=10)


@pytest.fixture
async def core(aiohttp_client: Any, tmp_path: Path) -> Core:
    return await start_core(aiohttp_client, tmp_path / "data", **{
        "storage.min_free_mb": 0, "limits.questions_per_minute": 3})


async def test_no_credential_no_answer_on_any_http_route(core: Core, tmp_path: Path) -> None:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{core.client.server.port}") as anon:
        response = await anon.post("/api/ask", json={"text": "How do I reset it?"}, headers=SSE)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await response.json())["error"]["code"] == "unauthorized"
        assert (await anon.get("/api/sessions/AAAAAAAAAAAA/requests/x/events")).status == 401
        assert (await anon.get("/healthz")).status == 200  # the liveness probe stays open
        assert (await anon.get("/readyz")).status == 401
        metrics = await anon.get("/metrics")  # loopback (the default): no credential needed
        assert metrics.status == 200 and "edgekb_requests_total" in await metrics.text()
    async with openai_client(core, "not-a-token") as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "How do I reset it?"}])
        assert refused.value.body["type"] == "authentication_error"
        assert refused.value.body["code"] == "unauthorized"
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    assert core.engine.started == [], "a refused request reached the answer engine"


async def test_a_plain_user_asks_and_cancels_but_cannot_read_another_users_request(
        core: Core) -> None:
    alice, bob = token_of(core, "alice", "user"), token_of(core, "bob", "user")
    response = await core.client.post("/api/ask", json={"text": "q", "id": "a1"},
                                      headers={**SSE, **bearer(alice)})
    assert response.status == 200, await response.text()
    session = response.headers["Edgekb-Session"]
    assert answer_of(request_events(await read_events(response))) == SCRIPT
    url = f"/api/sessions/{session}/requests/a1"
    theirs = await core.client.get(url + "/events", headers={**SSE, **bearer(bob)})
    assert theirs.status == 404 and (await theirs.json())["error"]["code"] == "unknown_request"
    assert (await core.client.post(url + "/cancel", headers=bearer(bob))).status == 404
    assert (await core.client.post(url + "/cancel", headers=bearer(alice))).status == 202
    async with openai_client(core, alice) as client:
        completion = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "How do I reset it?"}])
        assert completion.choices[0].message.content == SCRIPT
        created = await client.responses.create(model="m", input="q", background=True)
    async with openai_client(core, bob) as client:
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(created.id)


async def test_one_question_budget_per_user_across_transports_and_every_question_audited(
        core: Core) -> None:
    carol = token_of(core, "carol", "user")
    response = await core.client.post("/api/ask", json={"text": "one", "id": "r1"},
                                      headers=bearer(carol))
    assert response.status == 200
    async with aiohttp.ClientSession(headers=bearer(carol)) as http, http.ws_connect(
            core.client.make_url("/ws"), protocols=(PROTOCOL,)) as ws:
        await ws.receive_json(timeout=5)  # welcome
        await ws.send_json({"type": "ask", "id": "r2", "text": "two"})
        for _ in range(50):
            frame = await ws.receive_json(timeout=5)
            if frame.get("id") == "r2" and frame["type"] in ("done", "error"):
                break
        assert frame["type"] == "done", frame
    async with openai_client(core, carol) as client:
        await client.chat.completions.create(model="m", messages=[{"role": "user",
                                                                   "content": "three"}])
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="m", messages=[{"role": "user",
                                                                       "content": "four"}])
    assert limited.value.body["code"] == "rate_limited"
    assert limited.value.body["type"] == "rate_limit_error"
    assert limited.value.response.headers["Retry-After"]
    over_sse = await core.client.post("/api/ask", json={"text": "five"},
                                      headers={**SSE, **bearer(carol)})
    assert over_sse.status == 429 and over_sse.headers["Retry-After"]
    audit = core.app[keys.SETTINGS].audit_path
    asked = await wait_for_audit(audit, {"event": "question", "user": "carol", "outcome": "ok"},
                                 count=3)
    assert len(asked) == 3 and {"r1", "r2"} <= {line["request"] for line in asked}
    assert all(line["address"] == "127.0.0.1" for line in asked)
    refused = [line for line in audit_lines(audit) if line.get("event") == "question"
               and line.get("user") == "carol" and line.get("outcome") == "rate_limited"]
    assert refused, "the refused question left no audit line"
