"""/healthz, /readyz and /metrics in-process, on the scripted answer engine: the exposition
parses with prometheus-client's own parser, its counters move as requests happen, readiness
fails on a disk under its floor, and /metrics serves loopback only unless told otherwise."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from core_helpers import Core, start_core, until
from prometheus_client.parser import text_string_to_metric_families
from sse_client import read_events, request_events

from scripted import ScriptedAnswers

from edgekb.app import create_app
from edgekb.config import load_settings
from edgekb.tokens import token_authority

SSE = {"Accept": "text/event-stream"}


@pytest.fixture
async def core(aiohttp_client, tmp_path: Path) -> Core:  # type: ignore[no-untyped-def]
    return await start_core(aiohttp_client, tmp_path / "data", **{"storage.min_free_mb": 0})


async def scrape(core: Core) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await core.client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_parse_and_counters_move_as_requests_happen(core: Core) -> None:
    before = await scrape(core)
    assert value(before, "edgekb_requests_total", outcome="stop") == 0
    assert value(before, "process_resident_memory_bytes") > 10 * 2**20
    for name in ("edgekb_connections", "edgekb_queue_waiting", "edgekb_index_vectors",
                 "edgekb_documents", "edgekb_chunks", "edgekb_resumes_total",
                 "edgekb_time_to_first_token_seconds_count"):
        assert any(key[0] == name for key in before), f"{name} is missing"
    core.engine.default.hold_after = 2
    response = await core.client.post("/api/ask", json={"text": "held", "id": "m1"},
                                      headers=SSE)
    session = response.headers["Edgekb-Session"]
    await until(lambda: "held" in core.engine.started)
    during = await scrape(core)
    assert value(during, "edgekb_connections", transport="sse") == 1
    peer = await core.connect(session)
    assert value(await scrape(core), "edgekb_connections", transport="ws") == 1
    await peer.send({"type": "resume", "id": "m1", "after": 1})  # a second device follows
    core.engine.gate.set()
    await peer.until_end("m1")
    frames = request_events(await read_events(response))
    refused = await core.client.post("/api/ask", json={"text": "again", "id": "m1",
                                                       "session": session})
    assert refused.status == 409
    after = await scrape(core)
    assert value(after, "edgekb_requests_total", outcome="stop") == 1
    assert value(after, "edgekb_resumes_total") == 1
    # The device resumed after seq 1 while the answer was held: the stored events 2.. came again.
    assert 1 <= value(after, "edgekb_replayed_events_total") <= len(frames) - 1
    assert value(after, "edgekb_refusals_total", code="id_reuse") == 1
    assert value(after, "edgekb_connections", transport="sse") == 0


async def test_labels_carry_no_content(core: Core) -> None:
    secret = "the-operator-password-is-hunter2"
    await read_events(await core.client.post("/api/ask", json={"text": secret, "id": "x"},
                                             headers=SSE))
    text = await (await core.client.get("/metrics")).text()
    assert secret not in text and "pump-manual" not in text


async def test_readyz_checks_the_store_and_the_disk_floor(aiohttp_client, tmp_path: Path) -> None:
    ready = await start_core(aiohttp_client, tmp_path / "ok", **{"storage.min_free_mb": 0})
    response = await ready.client.get("/readyz")
    body = await response.json()
    assert response.status == 200, body
    assert body == {"status": "ready", "checks": {"models": "ok", "index": "ok", "store": "ok",
                                                  "disk": "ok", "server": "ok"}}
    assert (await (await ready.client.get("/healthz")).json()) == {"status": "ok"}
    full = await start_core(aiohttp_client, tmp_path / "full", **{"storage.min_free_mb": 1 << 20})
    response = await full.client.get("/readyz")
    assert response.status == 503
    error = (await response.json())["error"]
    assert error["code"] == "not_ready" and "floor" in error["checks"]["disk"]
    assert error["checks"]["store"] == "ok"
    assert (await full.client.get("/healthz")).status == 200  # alive, only not ready


def _outward_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet is sent: only a route is chosen
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.mark.parametrize("access, anonymous, signed_in", [("loopback", 403, 403),
                                                         ("token", 401, 200)])
async def test_metrics_from_another_machine_need_the_token_mode_and_a_credential(
        aiohttp_server, aiohttp_client, tmp_path: Path, access: str, anonymous: int,
        signed_in: int) -> None:
    address = _outward_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    settings = load_settings(env={}, overrides={
        "data_dir": tmp_path / "data", "storage.min_free_mb": 0, "metrics.access": access})
    token, _ = token_authority(settings).issue("scraper", "user", 3600)
    server = await aiohttp_server(create_app(settings, answers=ScriptedAnswers()), host=address)
    client = await aiohttp_client(server)
    response = await client.get("/metrics")
    assert response.status == anonymous
    assert (await response.json())["error"]["code"] in ("forbidden", "unauthorized")
    response = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status == signed_in
    if signed_in == 200:
        assert "edgekb_requests_total" in await response.text()


async def test_metrics_on_this_machine_need_a_credential_in_the_token_mode(
        aiohttp_client, tmp_path: Path) -> None:
    settings = load_settings(env={}, overrides={
        "data_dir": tmp_path / "data", "storage.min_free_mb": 0, "metrics.access": "token"})
    client = await aiohttp_client(create_app(settings, answers=ScriptedAnswers()))
    assert (await client.get("/metrics")).status == 401
