"""The appliance locked down, tried against the real `edgekb serve` with real clients: every
refusal of the issue (credentials, Origin, Host, limits, slow and flooding clients), the audit
lines they leave, TLS, the CLI, and a fuzz run while a good client streams an answer."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import resource
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import (
    DEMO_QUESTION,
    Server,
    collect,
    edgekb_env,
    issue_token,
    receive_json,
    run_edgekb,
    start_server,
)
from securelib import (
    audit_lines,
    body_of,
    claims,
    forge,
    one_response,
    raw_request,
    status_of,
    wait_for_audit,
)

from edgekb.protocol import PROTOCOL

PROTOCOLS = (PROTOCOL,)
FAST = ("--set", "generation.max_tokens=48", "--set", "retrieval.k=1")
SECURE = (*FAST, "--set", "limits.header_timeout_s=3", "--set", "server.idle_timeout_s=4",
          "--set", "server.heartbeat_s=1", "--set", "auth.algorithms=HS256,RS256",
          "--set", "limits.upload_request_mb=1", "--set", "limits.questions_per_minute=20")


@pytest.fixture(scope="module")
def sso_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """An RSA key pair of 'another issuer' (a plant's single sign-on)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("sso") / "sso.pem"
    path.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, path


def serve_copy(tmp_path_factory: pytest.TempPathFactory, demo_data_dir: Path,
               models_cache: Path, name: str, *settings: str, **kw: Any) -> Server:
    data_dir = tmp_path_factory.mktemp(name) / "data"
    shutil.copytree(demo_data_dir, data_dir)
    return start_server(data_dir, edgekb_env(models_cache), *settings, **kw)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, demo_data_dir: Path, models_cache: Path,
           sso_key: tuple[Any, Path]) -> Iterator[Server]:
    srv = serve_copy(tmp_path_factory, demo_data_dir, models_cache, "secure", *SECURE,
                     "--set", f"auth.public_key_file={sso_key[1]}")
    yield srv
    srv.stop()


def port_of(srv: Server) -> int:
    return int(srv.url.rstrip("/").rsplit(":", 1)[1])


def signing_key(srv: Server) -> tuple[str, bytes]:
    """(kid, secret) of the server's current key, read from its data dir like an operator."""
    keys = json.loads((srv.data_dir / "auth" / "keys.json").read_text())["keys"]
    current = [k for k in keys if k["retired"] is None][-1]
    return current["kid"], base64.urlsafe_b64decode(current["secret"])


def audit_of(srv: Server) -> Path:
    return srv.data_dir / "audit.log"


@contextlib.asynccontextmanager
async def client(srv: Server, token: str | None = None,
                 **kw: Any) -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"Authorization": f"Bearer {token or srv.token}"}
    async with aiohttp.ClientSession(headers=headers, **kw) as http:
        yield http


# --- credentials ---------------------------------------------------------------------------

async def test_every_bad_credential_is_refused_before_the_upgrade(
        secure: Server, sso_key: tuple[Any, Path]) -> None:
    import jwt

    kid, secret = signing_key(secure)
    pem = sso_key[1].read_bytes()
    header = {"alg": "HS256", "typ": "JWT", "kid": kid}
    tokens = {
        "none": None,
        "expired": forge(header, claims(ttl=-60), secret),
        "wrong signature": forge(header, claims(), os.urandom(32)),
        "alg none": forge({**header, "alg": "none"}, claims(), None),
        "HS/RS confusion": forge({"alg": "HS256", "typ": "JWT"}, claims(), pem),
        "missing exp": forge(header, claims(exp=None), secret),
        "missing sub": forge(header, claims(sub=None), secret),
        "wrong audience": forge(header, claims(aud="grafana"), secret),
        "RS256 of an unknown key": jwt.encode(claims(), _other_rsa_key(), algorithm="RS256"),
    }
    async with aiohttp.ClientSession() as http:
        for name, token in tokens.items():
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(secure.ws_url, protocols=PROTOCOLS, headers=headers)
            assert refused.value.status == 401, name
            async with http.get(secure.url + "api/kbs", headers=headers) as response:
                body = await response.json()
                assert response.status == 401 and body["error"]["code"] == "unauthorized", name
        # The same token that works in a header is refused in the URL.
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await http.ws_connect(f"{secure.ws_url}?token={secure.token}", protocols=PROTOCOLS)
        # The genuine ones work: ours in a header, the other issuer's RS256 one, and ours as
        # the browser's second subprotocol.
        sso = jwt.encode(claims(sub="sso-ann", role="user"), sso_key[0], algorithm="RS256")
        for headers, protocols in (({"Authorization": f"Bearer {secure.token}"}, PROTOCOLS),
                                   ({"Authorization": f"Bearer {sso}"}, PROTOCOLS),
                                   ({}, (*PROTOCOLS, f"bearer.{secure.token}"))):
            async with http.ws_connect(secure.ws_url, protocols=protocols,
                                       headers=headers) as ws:
                assert ws.protocol == PROTOCOL
                assert (await receive_json(ws))["type"] == "welcome"
    refused_lines = await wait_for_audit(audit_of(secure), {"event": "refused",
                                                             "outcome": "unauthorized"})
    assert refused_lines and all(line["address"] == "127.0.0.1" for line in refused_lines)
    trail = audit_of(secure).read_text()
    assert secure.token not in trail and "Bearer" not in trail


def _other_rsa_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import rsa
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


async def test_an_open_connection_ends_with_4001_once_its_token_is_revoked(
        secure: Server, models_cache: Path) -> None:
    env = edgekb_env(models_cache)
    token = issue_token(secure.data_dir, env, role="user", sub="lost-tablet")
    async with client(secure, token) as http, http.ws_connect(secure.ws_url,
                                                              protocols=PROTOCOLS) as ws:
        await receive_json(ws)
        await ws.send_json({"type": "ping"})
        assert (await receive_json(ws))["type"] == "pong"
        run_edgekb(["token", "revoke", "--sub", "lost-tablet", "--data-dir",
                    str(secure.data_dir)], env, check=True)
        await ws.send_json({"type": "ping"})
        msg = await asyncio.wait_for(ws.receive(), 20)
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 4001
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with client(secure, token) as http:
            await http.ws_connect(secure.ws_url, protocols=PROTOCOLS)
    assert refused.value.status == 401


async def test_a_user_token_cannot_change_documents(secure: Server, models_cache: Path) -> None:
    user = issue_token(secure.data_dir, edgekb_env(models_cache), role="user", sub="line-tablet")
    async with client(secure, user) as http:
        async with http.get(secure.url + "api/kbs") as response:
            assert response.status == 200
        async with http.post(secure.url + "api/kbs/default/reindex") as response:
            assert response.status == 403
            assert (await response.json())["error"]["code"] == "forbidden"
    line = (await wait_for_audit(audit_of(secure), {"event": "refused",
                                                     "outcome": "forbidden"}))[0]
    assert line["user"] == "line-tablet" and line["path"] == "/api/kbs/default/reindex"


# --- cross-site ----------------------------------------------------------------------------

async def test_foreign_origin_is_refused_on_the_upgrade_and_on_a_form_post(
        secure: Server) -> None:
    evil = {"Origin": "http://evil.example"}
    async with client(secure) as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(secure.ws_url, protocols=PROTOCOLS, headers=evil)
        assert refused.value.status == 403
        async with http.get(secure.url + "api/kbs/default/documents") as response:
            documents = (await response.json())["documents"]
        target = documents[0]["id"]
        # What a page on another site can make a browser send: no preflight, its Origin.
        async with http.post(secure.url + "api/kbs/default/documents",
                             data={"file": "x"}, headers=evil) as response:
            assert response.status == 403
            assert (await response.json())["error"]["code"] == "forbidden_origin"
        async with http.delete(secure.url + f"api/kbs/default/documents/{target}",
                               headers=evil) as response:
            assert response.status == 403
        async with http.get(secure.url + "api/kbs/default/documents") as response:
            assert [d["id"] for d in (await response.json())["documents"]] == \
                [d["id"] for d in documents]  # nothing was deleted
    await asyncio.sleep(2.5)  # refusals within a second are one line with their count
    lines = await wait_for_audit(audit_of(secure), {"event": "refused",
                                                     "outcome": "forbidden_origin"})
    assert sum(line.get("count", 1) for line in lines) >= 3


async def test_a_dns_rebinding_host_is_refused(secure: Server) -> None:
    port = port_of(secure)
    for path in ("/api/kbs", "/ws"):
        response = await one_response("127.0.0.1", port, (
            f"GET {path} HTTP/1.1\r\nHost: attacker.example:{port}\r\n"
            f"Authorization: Bearer {secure.token}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode())
        assert status_of(response) == 400 and body_of(response)["error"]["code"] == "bad_host"
    healthz = await raw_request("127.0.0.1", port, b"GET /healthz HTTP/1.1\r\n"
                                b"Host: anything\r\nConnection: close\r\n\r\n")
    assert status_of(healthz) == 200


# --- limits --------------------------------------------------------------------------------

async def test_too_many_connections_from_one_address(secure: Server) -> None:
    port = port_of(secure)
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.3", 0), limit=0)
    async with client(secure, connector=connector) as http:
        held = [await http.ws_connect(secure.ws_url, protocols=PROTOCOLS) for _ in range(20)]
        try:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(secure.ws_url, protocols=PROTOCOLS)
            assert refused.value.status == 429
            # The refusal is written as the connection opens; read it without sending first
            # (bytes sent to a socket closed after its refusal can come back as a reset).
            answer = await raw_request("127.0.0.1", port, b"", local_addr="127.0.0.3")
            error = body_of(answer)["error"]
            assert error["code"] == "too_many_connections" and error["retry_after"] > 0
            async with client(secure) as admin, admin.ws_connect(
                    secure.ws_url, protocols=PROTOCOLS) as ws:  # from 127.0.0.1
                assert (await receive_json(ws))["type"] == "welcome"
        finally:
            for ws in held:
                await ws.close()
    line = (await wait_for_audit(audit_of(secure), {"event": "connection_refused",
                                                     "address": "127.0.0.3"}))[0]
    assert line["outcome"] == "too_many_connections"


async def test_an_idle_connection_is_closed_though_the_server_pings_it(secure: Server) -> None:
    async with client(secure) as http, http.ws_connect(secure.ws_url, protocols=PROTOCOLS,
                                                       autoping=True) as ws:
        assert (await receive_json(ws))["type"] == "welcome"
        started = time.monotonic()
        msg = await asyncio.wait_for(ws.receive(), 20)  # pings are answered by autoping
        while msg.type == aiohttp.WSMsgType.TEXT:  # a notice may come first
            msg = await asyncio.wait_for(ws.receive(), 20)
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 4008
        assert 3.5 < time.monotonic() - started < 8


async def test_an_oversized_frame_gets_a_typed_error_and_an_absurd_one_a_typed_close(
        secure: Server) -> None:
    async with client(secure) as http, http.ws_connect(secure.ws_url, protocols=PROTOCOLS,
                                                       max_msg_size=0) as ws:
        await receive_json(ws)
        await ws.send_str(json.dumps({"type": "ask", "id": "big", "text": "x" * 70_000}))
        error = await receive_json(ws)
        assert error["type"] == "error" and error["code"] == "too_large"
        await ws.send_json({"type": "ping"})
        assert (await receive_json(ws))["type"] == "pong"  # the connection lives on
        # Past aiohttp's 4 MiB frame cap the server closes with 1009 at the frame's header,
        # without reading the rest; a client still sending then sees the TCP reset instead.
        try:
            await ws.send_str("y" * (5 * 1024 * 1024))
            msg = await asyncio.wait_for(ws.receive(), 20)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.ERROR)
            assert ws.close_code in (1009, 1006, None), ws.close_code
        except ConnectionError:
            pass
    async with client(secure) as http, http.ws_connect(secure.ws_url,
                                                       protocols=PROTOCOLS) as ws:
        assert (await receive_json(ws))["type"] == "welcome"  # the server is unharmed


async def test_slowloris_sockets_are_closed_in_time_and_healthz_answers(secure: Server) -> None:
    port = port_of(secure)
    # 100 sockets from five addresses (20 each, the per-address cap), each dripping headers.
    sockets = [await asyncio.open_connection("127.0.0.1", port,
                                             local_addr=(f"127.0.1.{n % 5 + 1}", 0))
               for n in range(100)]
    started = time.monotonic()
    for _, writer in sockets:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
    answers = [asyncio.create_task(reader.read(4096)) for reader, _ in sockets]
    for _ in range(80):  # one header line a second, never finishing
        if all(a.done() for a in answers):
            break
        for (_, writer), answer in zip(sockets, answers):
            if not answer.done():
                with contextlib.suppress(ConnectionError):
                    writer.write(b"X-Drip: 1\r\n")
        healthz = await raw_request("127.0.0.1", port, b"GET /healthz HTTP/1.1\r\n"
                                    b"Host: localhost\r\nConnection: close\r\n\r\n")
        assert status_of(healthz) == 200
        await asyncio.sleep(0.5)
    closed_after = time.monotonic() - started
    results = await asyncio.gather(*answers, return_exceptions=True)
    for _, writer in sockets:
        writer.close()
    assert all(isinstance(r, bytes) and status_of(r) == 408 for r in results), results[:3]
    assert closed_after < 3 + 2  # header_timeout_s is 3 in this server
    await asyncio.sleep(2.5)
    lines = await wait_for_audit(audit_of(secure), {"event": "slow_client"})
    # Coalesced per address: a line or two from each of the five, with exact counts.
    assert len(lines) <= 5 * 3 and sum(line.get("count", 1) for line in lines) == 100


async def test_over_the_question_rate_is_refused_with_retry_after(secure: Server,
                                                                  models_cache: Path) -> None:
    token = issue_token(secure.data_dir, edgekb_env(models_cache), role="user", sub="hammer")
    async with client(secure, token) as http, http.ws_connect(secure.ws_url,
                                                              protocols=PROTOCOLS) as ws:
        await receive_json(ws)
        for n in range(24):
            await ws.send_json({"type": "ask", "id": f"q{n}", "text": DEMO_QUESTION})
        refusals: dict[str, dict[str, Any]] = {}
        last = {f"q{n}" for n in range(20, 24)}
        deadline = time.monotonic() + 60
        while not last <= set(refusals) and time.monotonic() < deadline:
            frame = await receive_json(ws, timeout=60)
            if frame["type"] == "error" and "seq" not in frame:  # a refusal, not an ending
                refusals[frame["id"]] = frame
        for n in range(24):
            await ws.send_json({"type": "cancel", "id": f"q{n}"})
        # A client that keeps asking while refused is closed with 4029 after ten in a row.
        for n in range(24, 40):
            await ws.send_json({"type": "ask", "id": f"q{n}", "text": DEMO_QUESTION})
        for _ in range(200):
            msg = await asyncio.wait_for(ws.receive(), 60)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 4029, msg
    rated = [refusals[f"q{n}"] for n in range(20, 24)]
    assert all(r["code"] == "rate_limited" for r in rated), refusals
    assert all(0 < r["retry_after"] <= 3.1 for r in rated), rated  # one question per 3 s
    # The first 20 were within the budget: run, queued, or refused only by the queue (busy).
    assert {refusals[f"q{n}"]["code"] for n in range(20) if f"q{n}" in refusals} <= {"busy"}
    lines = await wait_for_audit(audit_of(secure), {"event": "question", "user": "hammer",
                                                     "outcome": "rate_limited"})
    assert lines and "question" not in lines[0]  # the text is not kept by default


async def test_session_ids_are_issued_by_the_server_and_owned_by_their_user(
        secure: Server, models_cache: Path) -> None:
    other = issue_token(secure.data_dir, edgekb_env(models_cache), role="user", sub="other")
    async with client(secure) as http:
        for chosen in ("AAAAAAAAAAAAAAAA", "abcdefgh%0A"):  # made up; one with a newline
            async with http.ws_connect(f"{secure.ws_url}?session={chosen}",
                                       protocols=PROTOCOLS) as ws:
                welcome = await receive_json(ws)
                assert welcome["session"] != chosen.replace("%0A", "\n")
                assert not welcome["resumed"]
        async with http.ws_connect(secure.ws_url, protocols=PROTOCOLS) as ws:
            mine = (await receive_json(ws))["session"]
            await ws.send_json({"type": "ask", "id": "own", "text": DEMO_QUESTION})
            assert (await collect(ws, "own"))[-1]["type"] == "done"
        async with http.ws_connect(f"{secure.ws_url}?session={mine}",
                                   protocols=PROTOCOLS) as ws:
            welcome = await receive_json(ws)
            assert welcome["session"] == mine and welcome["resumed"]
    async with client(secure, other) as http, http.ws_connect(
            f"{secure.ws_url}?session={mine}", protocols=PROTOCOLS) as ws:
        welcome = await receive_json(ws)  # another user cannot take it over
        assert welcome["session"] != mine and not welcome["resumed"]
        await ws.send_json({"type": "history"})
        assert (await receive_json(ws))["turns"] == []


async def test_an_upload_request_over_its_total_is_refused_and_nothing_kept(
        secure: Server) -> None:
    files = {f"part{n}.md": (f"# Part {n}\n\n" + "valve " * 100_000).encode()
             for n in range(3)}  # each 600 KB, under the per-file cap; 1.8 MB in all
    form = aiohttp.FormData()
    for name, data in files.items():
        form.add_field("file", data, filename=name, content_type="text/markdown")
    async with client(secure) as http:
        async with http.post(secure.url + "api/kbs/upload-cap/documents",
                             data=form) as response:
            body = await response.json()
        assert response.status == 413 and body["error"]["code"] == "too_large", body
        assert "upload_request_mb" in body["error"]["message"]
        async with http.get(secure.url + "api/kbs") as response:
            assert "upload-cap" not in {kb["name"] for kb in (await response.json())["kbs"]}
    folder = secure.data_dir / "docs" / "upload-cap"
    assert not folder.exists() or not any(folder.iterdir())
    # A request that declares more than the cap is refused before its body is read.
    started = time.monotonic()
    answer = await one_response("127.0.0.1", port_of(secure), (
        "POST /api/kbs/upload-cap/documents HTTP/1.1\r\nHost: localhost\r\n"
        f"Authorization: Bearer {secure.token}\r\n"
        "Content-Type: multipart/form-data; boundary=x\r\n"
        f"Content-Length: {50 * 2**20}\r\n\r\n").encode())
    assert status_of(answer) == 413 and time.monotonic() - started < 5
    line = (await wait_for_audit(audit_of(secure), {"event": "upload", "outcome": "413"}))[0]
    assert line["user"] == "test-admin" and line["kb"] == "upload-cap"


# --- the flood -------------------------------------------------------------------------------

@pytest.fixture
def fd_limited(tmp_path_factory: pytest.TempPathFactory, demo_data_dir: Path,
               models_cache: Path) -> Iterator[Server]:
    """A server whose file-descriptor limit is 1,024 (soft and hard: it cannot raise it)."""
    srv = serve_copy(tmp_path_factory, demo_data_dir, models_cache, "flood", *FAST,
                     launcher=("prlimit", "--nofile=1024:1024"))
    yield srv
    srv.stop()


async def test_a_flood_of_3000_connections_leaves_healthz_and_a_welcome_for_the_admin(
        fd_limited: Server) -> None:
    port = port_of(fd_limited)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    upgrade = (f"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
               f"Sec-WebSocket-Protocol: {PROTOCOL}\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               f"Authorization: Bearer {fd_limited.token}\r\n\r\n").encode()
    outcomes: dict[str, int] = {}
    held: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(100)

    async def one() -> None:
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port, local_addr=("127.0.0.2", 0)), 30)
            except (OSError, asyncio.TimeoutError) as exc:
                outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
                return
            held.append(writer)  # kept open: the flood holds every socket it got
            writer.write(upgrade)
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                key = head.split(b" ", 2)[1].decode()
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                key = "closed"
            outcomes[key] = outcomes.get(key, 0) + 1

    flood = asyncio.gather(*(one() for _ in range(3000)))
    try:
        await asyncio.wait_for(asyncio.shield(flood), 240)
        assert outcomes.get("101") == 20 and outcomes.get("429", 0) >= 2900, outcomes
        # The admin, from another address, while every flood socket is still open.
        async with client(fd_limited) as admin:
            async with admin.get(fd_limited.url + "healthz") as response:
                assert response.status == 200
            async with admin.ws_connect(fd_limited.ws_url, protocols=PROTOCOLS) as ws:
                assert (await receive_json(ws))["type"] == "welcome"
    finally:
        for writer in held:
            writer.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    log = fd_limited.log.read_text()
    assert "Too many open files" not in log and "out of system resource" not in log
    await asyncio.sleep(2.5)  # the last window's summary line
    refusals = [line for line in audit_lines(fd_limited.data_dir / "audit.log")
                if line["event"] == "connection_refused"]
    assert sum(r.get("count", 1) for r in refusals) == outcomes["429"]
    assert len(refusals) < 300  # coalesced: the trail does not grow with the flood


async def test_a_brute_forced_login_is_slowed_and_audited(secure: Server,
                                                          models_cache: Path) -> None:
    env = edgekb_env(models_cache)
    added = subprocess.run([sys.executable, "-m", "edgekb", "users", "add", "olga", "--role",
                            "user", "--password-stdin", "--data-dir", str(secure.data_dir)],
                           input="pump-room-42\n", env=env, capture_output=True, text=True,
                           timeout=60, check=False)
    assert added.returncode == 0, added.stderr
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.9", 0))
    async with aiohttp.ClientSession(connector=connector) as http:
        statuses = []
        for n in range(7):
            async with http.post(secure.url + "api/login",
                                 json={"name": "olga", "password": f"guess{n}"}) as response:
                statuses.append(response.status)
                body = await response.json()
        assert statuses[:5] == [401] * 5 and statuses[5:] == [429, 429], statuses
        assert body["error"]["code"] == "rate_limited" and body["error"]["retry_after"] > 0
        await asyncio.sleep(body["error"]["retry_after"] + 0.2)
        async with http.post(secure.url + "api/login",
                             json={"name": "olga", "password": "pump-room-42"}) as response:
            assert response.status == 200
            assert "HttpOnly" in response.headers["Set-Cookie"]
    logins = [line for line in audit_lines(audit_of(secure)) if line["event"] == "login"
              and line["address"] == "127.0.0.9"]
    assert [line["outcome"] for line in logins].count("login_failed") == 5
    assert any(line["outcome"] == "ok" and line["user"] == "olga" for line in logins)
    assert "pump-room-42" not in audit_of(secure).read_text()


# --- TLS, auth off, CLI --------------------------------------------------------------------

def test_binding_beyond_loopback_with_auth_off_is_refused(tmp_path: Path,
                                                          models_cache: Path) -> None:
    result = run_edgekb(["serve", "--data-dir", str(tmp_path / "data"), "--host", "0.0.0.0",
                         "--port", "0", "--set", "auth.enabled=false"],
                        edgekb_env(models_cache), timeout=120)
    assert result.returncode == 2
    assert "[auth_required]" in result.stderr and "auth.enabled" in result.stderr
    assert "edgekb ready" not in result.stderr


async def test_auth_off_is_allowed_on_loopback_and_still_checks_origin(
        tmp_path_factory: pytest.TempPathFactory, demo_data_dir: Path,
        models_cache: Path) -> None:
    """The one server of the suite without authentication: a development box on 127.0.0.1."""
    srv = serve_copy(tmp_path_factory, demo_data_dir, models_cache, "open", *FAST,
                     "--set", "auth.enabled=false")
    try:
        async with aiohttp.ClientSession() as http:  # no credential at all
            async with http.get(srv.url + "api/kbs") as response:
                assert response.status == 200
            async with http.ws_connect(srv.ws_url, protocols=PROTOCOLS) as ws:
                assert (await receive_json(ws))["type"] == "welcome"
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(srv.ws_url, protocols=PROTOCOLS,
                                      headers={"Origin": "http://evil.example"})
            assert refused.value.status == 403
    finally:
        srv.stop()


async def test_tls_serves_https_and_wss_with_a_self_signed_pair(
        tmp_path_factory: pytest.TempPathFactory, demo_data_dir: Path,
        models_cache: Path) -> None:
    data_dir = tmp_path_factory.mktemp("tls") / "data"
    shutil.copytree(demo_data_dir, data_dir)
    env = edgekb_env(models_cache)
    made = run_edgekb(["tls", "self-signed", "--data-dir", str(data_dir)], env, check=True)
    assert "tls.certificate=" in made.stdout
    cert, key = data_dir / "tls" / "cert.pem", data_dir / "tls" / "key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    srv = start_server(data_dir, env, *FAST, "--set", f"tls.certificate={cert}",
                       "--set", f"tls.private_key={key}")
    try:
        assert srv.url.startswith("https://")
        trust = ssl.create_default_context(cafile=str(cert))
        async with client(srv) as http:
            async with http.get(srv.url + "healthz", ssl=trust) as response:
                assert response.status == 200
            async with http.ws_connect(srv.ws_url, protocols=PROTOCOLS, ssl=trust) as ws:
                assert (await receive_json(ws))["type"] == "welcome"
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await http.get(srv.url + "healthz")  # not trusted without the certificate
        plain = await raw_request("127.0.0.1", port_of(srv), b"GET /healthz HTTP/1.1\r\n"
                                  b"Host: localhost\r\n\r\n")
        assert not plain.startswith(b"HTTP/1.1 200")
        asked = subprocess.run(
            [sys.executable, "-m", "edgekb", "ask", DEMO_QUESTION, "--url", srv.ws_url,
             "--cafile", str(cert), "--json"], env={**env, "EDGEKB_TOKEN": srv.token},
            capture_output=True, text=True, timeout=300, check=False)
        assert asked.returncode == 0, asked.stderr
        assert json.loads(asked.stdout.splitlines()[-1])["type"] == "done"
    finally:
        srv.stop()


def test_cli_ask_needs_a_token_and_says_so(secure: Server, models_cache: Path) -> None:
    env = edgekb_env(models_cache)
    refused = run_edgekb(["ask", DEMO_QUESTION, "--url", secure.ws_url], env)
    assert refused.returncode == 1 and "--token" in refused.stderr
    answered = run_edgekb(["ask", DEMO_QUESTION, "--url", secure.ws_url, "--token",
                           secure.token, "--json"], env)
    assert answered.returncode == 0, answered.stderr
    events = [json.loads(line) for line in answered.stdout.splitlines()]
    assert events[-1]["type"] == "done"


def test_audit_tail_reads_the_trail(secure: Server, models_cache: Path) -> None:
    result = run_edgekb(["audit", "tail", "-n", "500", "--json", "--data-dir",
                         str(secure.data_dir)], edgekb_env(models_cache), check=True)
    events = {json.loads(line)["event"] for line in result.stdout.splitlines()}
    assert {"server_start", "token_issued", "connect", "disconnect"} <= events


# --- fuzz --------------------------------------------------------------------------------------

def _junk(rng: random.Random) -> str | bytes:
    kinds = [
        lambda: rng.randbytes(rng.randint(0, 300)),                         # binary frames
        lambda: "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(0, 80))),
        lambda: json.dumps(rng.choice([None, 1, "x", [], [1, 2], True, 3.5])),
        lambda: json.dumps({"type": rng.choice(["ask", "cancel", "resume", "hello",
                                                "history", "ping", "nope", "", None, 7])}),
        lambda: json.dumps({"type": "ask", "id": rng.choice(["", "a b", "x" * 65, 5, None,
                                                             "ok-id"]),
                            "text": rng.choice(["", None, 1, "x" * 4001, [], "hi"]),
                            "kbs": rng.choice([None, [], ["BAD KB"], "default", [1]])}),
        lambda: json.dumps({"type": "resume", "id": rng.choice(["r1", "q", ""]),
                            "after": rng.choice([-1, "3", None, 2 ** 60, 1.5])}),
        lambda: json.dumps({"type": "hello", "session": rng.choice(["short", "A" * 65, 1,
                                                                    "bad\n" * 3]),
                            "resume": rng.choice([1, [1], [{"id": 3}], "x"])}),
        lambda: json.dumps({"type": "history", "before": rng.choice([0, -5, "x"]),
                            "limit": rng.choice([0, 51, "20", None])}),
        lambda: '{"type": "ask", "id": "r1", "text": "' + "\\" * rng.randint(1, 5),
        lambda: "{" * rng.randint(1, 2000),
        lambda: "[" * rng.randint(1, 60_000),                               # deep nesting
    ]
    return rng.choice(kinds)()


async def test_fuzzed_frames_get_typed_answers_while_a_good_client_streams(
        secure: Server) -> None:
    rng = random.Random(1234)
    async with client(secure) as http:
        good = await http.ws_connect(secure.ws_url, protocols=PROTOCOLS)
        await receive_json(good)
        await good.send_json({"type": "ask", "id": "good", "text": DEMO_QUESTION})
        streaming = asyncio.create_task(collect(good, "good", timeout=300))

        async def fuzzer(n: int, frames: int) -> tuple[int, int]:
            """(frames sent, typed errors received); each bad frame must get one."""
            async with http.ws_connect(secure.ws_url, protocols=PROTOCOLS) as ws:
                await receive_json(ws)
                sent = errors = 0
                for _ in range(frames):
                    junk = _junk(rng)
                    if isinstance(junk, bytes):
                        await ws.send_bytes(junk)
                    else:
                        await ws.send_str(junk)
                    sent += 1
                    reply = await receive_json(ws, timeout=30)
                    while reply.get("type") == "notice":
                        reply = await receive_json(ws, timeout=30)
                    if reply["type"] == "error":
                        assert reply["code"] in {"bad_json", "unknown_type", "invalid_field",
                                                 "too_large", "unknown_request", "id_reuse",
                                                 "busy", "rate_limited"}, reply
                        errors += 1
                    else:  # a well-formed frame by chance: its own typed answer
                        assert reply["type"] in {"pong", "history", "welcome", "queued",
                                                 "status", "source", "sources", "delta",
                                                 "done"}, reply
                return sent, errors

        results = await asyncio.gather(*(fuzzer(n, 2600) for n in range(4)))
        events = await streaming
        await good.close()
    assert sum(sent for sent, _ in results) >= 10_000
    assert sum(errors for _, errors in results) >= 9_000
    assert events[-1]["type"] == "done", events[-1]
    deltas = "".join(e["text"] for e in events if e["type"] == "delta")
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert deltas.strip()
    if "text" in events[-1]:
        assert deltas == events[-1]["text"]
    async with client(secure) as http, http.get(secure.url + "healthz") as response:
        assert response.status == 200
