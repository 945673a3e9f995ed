"""The access layer on real sockets with real clients: credentials, roles, Origin, Host, CSRF,
login and its throttle, connection caps and slow clients. The app here is the real middleware,
login routes and guarded site in front of small handlers, so each refusal is seen in isolation
(tests/test_security.py does the same against the whole server)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from securelib import audit_lines, body_of, claims, forge, raw_request, status_of, wait_for_audit
from yarl import URL

from edgekb import users
from edgekb.access import ACCESS, PRINCIPAL, Access, access_middleware, add_login_routes, requires
from edgekb.audit import AuditLog
from edgekb.config import Settings, load_settings
from edgekb.protocol import PROTOCOL
from edgekb.security import guarded_site, open_audit
from edgekb.store import AsyncStore, Store
from edgekb.tls import make_self_signed
from edgekb.tokens import TokenAuthority, token_authority

PASSWORD = "correct horse battery"


@dataclass
class Stack:
    url: str
    port: int
    settings: Settings
    authority: TokenAuthority | None
    audit: AuditLog

    def token(self, role: str = "user", sub: str = "ann", ttl: float = 600) -> str:
        assert self.authority is not None
        return self.authority.issue(sub, role, ttl)[0]

    def bearer(self, role: str = "user", sub: str = "ann") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role, sub)}"}


async def _things(request: web.Request) -> web.Response:
    return web.json_response({"user": request[PRINCIPAL].sub})


@requires("admin", audit="change_things")
async def _change_things(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"changed": True})


async def _echo_ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=(PROTOCOL,))
    await ws.prepare(request)
    await ws.send_json({"type": "welcome", "user": request[PRINCIPAL].sub})
    async for msg in ws:
        await ws.send_str(msg.data)
    return ws


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@pytest.fixture
async def make_stack(tmp_path: Path) -> AsyncIterator[Any]:
    cleanups: list[Any] = []

    async def make(**overrides: Any) -> Stack:
        settings = load_settings(env={}, overrides={"data_dir": tmp_path / "data",
                                                    "server.port": 0, **overrides})
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        audit = open_audit(settings)
        store = AsyncStore(settings.db_path)
        db = Store(settings.db_path)
        if not users.password_row(db, "alice"):
            users.add_user(db, "alice", "admin", PASSWORD)
            users.add_user(db, "bob", "user", PASSWORD)
        db.close()
        authority = token_authority(settings) if settings.auth.enabled else None
        app = web.Application(middlewares=[access_middleware])
        app[ACCESS] = Access.create(settings, authority, audit, store)
        add_login_routes(app)
        app.router.add_get("/healthz", _ok)
        app.router.add_get("/", _ok)
        app.router.add_get("/api/things", _things)
        app.router.add_post("/api/things", _change_things)
        app.router.add_delete("/api/things", _plain_delete)
        app.router.add_get("/ws", _echo_ws)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = guarded_site(runner, settings, audit)
        await site.start()

        async def stop() -> None:
            await runner.cleanup()
            audit.close()
            store.close()
        cleanups.append(stop)
        return Stack(f"http://127.0.0.1:{site.port}/", site.port, settings, authority, audit)

    yield make
    for stop in reversed(cleanups):
        await stop()


async def _plain_delete(request: web.Request) -> web.Response:
    """An unmarked state-changing route: secure by default, it needs an admin."""
    return web.json_response({"deleted": True})


async def status_and_body(response: aiohttp.ClientResponse) -> tuple[int, dict[str, Any]]:
    return response.status, await response.json()


# --- credentials -----------------------------------------------------------------------------

async def test_no_credential_is_refused_with_a_typed_401_and_never_upgraded(make_stack) -> None:
    stack = await make_stack()
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.url + "api/things") as response:
            status, body = await status_and_body(response)
            assert status == 401 and body["error"]["code"] == "unauthorized"
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(stack.url + "ws", protocols=(PROTOCOL,))
        assert refused.value.status == 401
        async with http.get(stack.url + "healthz") as response:  # public
            assert response.status == 200
    lines = await wait_for_audit(stack.settings.audit_path,
                                 {"event": "refused", "outcome": "unauthorized"})
    assert lines and lines[0]["address"] == "127.0.0.1" and lines[0]["path"] == "/api/things"


async def test_a_token_in_the_url_is_refused_even_when_valid(make_stack) -> None:
    stack = await make_stack()
    async with aiohttp.ClientSession() as http, \
            http.get(stack.url + "api/things", params={"token": stack.token()}) as response:
        status, body = await status_and_body(response)
    assert status == 401 and "URL" in body["error"]["message"]


async def test_bearer_header_and_websocket_subprotocol_are_accepted(make_stack) -> None:
    stack = await make_stack()
    token = stack.token(sub="press-7")
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.url + "api/things",
                            headers={"Authorization": f"Bearer {token}"}) as response:
            assert (await response.json())["user"] == "press-7"
        # What a browser page does: the token as a second subprotocol; the server must answer
        # only the protocol, or the browser would fail the handshake.
        async with http.ws_connect(stack.url + "ws",
                                   protocols=(PROTOCOL, f"bearer.{token}")) as ws:
            assert ws.protocol == PROTOCOL
            assert (await ws.receive_json())["user"] == "press-7"
    connects = await wait_for_audit(stack.settings.audit_path, {"event": "connect"})
    assert connects[0]["user"] == "press-7" and connects[0]["via"] == "subprotocol"
    assert token not in stack.settings.audit_path.read_text()  # never a token in the trail


@pytest.mark.parametrize("case", ["expired", "wrong_signature", "alg_none", "missing_exp",
                                  "missing_jti", "wrong_audience", "wrong_issuer",
                                  "unknown_kid", "bad_role", "garbage"])
async def test_bad_tokens_are_refused_before_the_upgrade(make_stack, case: str) -> None:
    stack = await make_stack()
    assert stack.authority is not None
    key = stack.authority._keys.current
    header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
    token = {
        "expired": lambda: forge(header, claims(ttl=-120), key.secret),  # beyond the leeway
        "wrong_signature": lambda: forge(header, claims(), b"not the key" * 4),
        "alg_none": lambda: forge({**header, "alg": "none"}, claims(), None),
        "missing_exp": lambda: forge(header, claims(exp=None), key.secret),
        "missing_jti": lambda: forge(header, claims(jti=None), key.secret),
        "wrong_audience": lambda: forge(header, claims(aud="other-app"), key.secret),
        "wrong_issuer": lambda: forge(header, claims(iss="someone-else"), key.secret),
        "unknown_kid": lambda: forge({**header, "kid": "k-gone"}, claims(), key.secret),
        "bad_role": lambda: forge(header, claims(role="root"), key.secret),
        "garbage": lambda: "not.a.jwt",
    }[case]()
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(stack.url + "ws", protocols=(PROTOCOL,),
                                  headers={"Authorization": f"Bearer {token}"})
        assert refused.value.status == 401
        async with http.get(stack.url + "api/things",
                            headers={"Authorization": f"Bearer {token}"}) as response:
            status, body = await status_and_body(response)
    assert status == 401 and body["error"]["code"] == "unauthorized", body


async def test_hs_rs_confusion_is_refused(make_stack, tmp_path: Path) -> None:
    """With an RS256 issuer configured, a token 'signed' HS256 with its public key as the HMAC
    secret (the classic confusion attack) is refused; a real RS256 token is accepted."""
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "sso.pem").write_bytes(pem)
    stack = await make_stack(**{"auth.algorithms": "HS256,RS256",
                                "auth.public_key_file": str(tmp_path / "sso.pem")})
    confused = forge({"alg": "HS256", "typ": "JWT"}, claims(), pem)
    confused_kid = forge({"alg": "HS256", "typ": "JWT", "kid": "external"}, claims(), pem)
    genuine = jwt.encode(claims(sub="sso-user", role="user"), private, algorithm="RS256")
    async with aiohttp.ClientSession() as http:
        for token in (confused, confused_kid):
            async with http.get(stack.url + "api/things",
                                headers={"Authorization": f"Bearer {token}"}) as response:
                status, body = await status_and_body(response)
                assert status == 401 and "algorithm" in body["error"]["message"], body
        async with http.get(stack.url + "api/things",
                            headers={"Authorization": f"Bearer {genuine}"}) as response:
            assert response.status == 200 and (await response.json())["user"] == "sso-user"


# --- roles, Origin, Host, CSRF ---------------------------------------------------------------

async def test_state_changes_need_an_admin_and_unmarked_routes_default_to_admin(
        make_stack) -> None:
    stack = await make_stack()
    async with aiohttp.ClientSession() as http:
        for method in ("POST", "DELETE"):
            async with http.request(method, stack.url + "api/things",
                                    headers=stack.bearer("user")) as response:
                status, body = await status_and_body(response)
                assert status == 403 and body["error"]["code"] == "forbidden"
            async with http.request(method, stack.url + "api/things",
                                    headers=stack.bearer("admin", "alice")) as response:
                assert response.status == 200
    changed = await wait_for_audit(stack.settings.audit_path, {"event": "change_things"})
    assert changed[0]["user"] == "alice" and changed[0]["outcome"] == "200"


async def test_foreign_origin_is_refused_on_the_upgrade_and_on_state_changes(make_stack) -> None:
    stack = await make_stack(**{"auth.allowed_origins": "https://hmi.plant.example"})
    evil = {"Origin": "https://evil.example"}
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(stack.url + "ws", protocols=(PROTOCOL,),
                                  headers={**stack.bearer(), **evil})
        assert refused.value.status == 403
        async with http.post(stack.url + "api/things", data={"a": "1"},
                             headers={**stack.bearer("admin"), **evil}) as response:
            status, body = await status_and_body(response)
            assert status == 403 and body["error"]["code"] == "forbidden_origin"
        for origin in (f"http://127.0.0.1:{stack.port}", "https://hmi.plant.example"):
            async with http.ws_connect(stack.url + "ws", protocols=(PROTOCOL,),
                                       headers={**stack.bearer(), "Origin": origin}) as ws:
                assert (await ws.receive_json())["type"] == "welcome"
        # A page served by another port of the same host is another origin.
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await http.ws_connect(stack.url + "ws", protocols=(PROTOCOL,),
                                  headers={**stack.bearer(), "Origin": "http://127.0.0.1:1"})
        async with http.get(stack.url + "api/things",  # a read: the browser's CORS guards it
                            headers={**stack.bearer(), **evil}) as response:
            assert response.status == 200


async def test_a_rebinding_host_is_refused(make_stack) -> None:
    stack = await make_stack(**{"auth.hostnames": "edgekb.plant.example"})
    token = stack.token()
    for host, expected in ((f"evil.example:{stack.port}", 400), ("evil.example", 400),
                           (f"127.0.0.1:{stack.port}", 200), (f"localhost:{stack.port}", 200),
                           ("edgekb.plant.example", 200), ("[::1]:8080", 200)):
        response = await raw_request("127.0.0.1", stack.port, (
            f"GET /api/things HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            "Connection: close\r\n\r\n").encode())
        assert status_of(response) == expected, (host, response[:200])
        if expected == 400:
            assert body_of(response)["error"]["code"] == "bad_host"


async def test_page_login_sets_an_httponly_strict_cookie_and_needs_csrf(make_stack) -> None:
    stack = await make_stack()
    origin = {"Origin": f"http://127.0.0.1:{stack.port}"}
    # unsafe: keep cookies of an IP address host, as browsers do.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.post(stack.url + "api/login", json={"name": "alice",
                                                            "password": PASSWORD},
                             headers=origin) as response:
            assert response.status == 200
            login = await response.json()
            cookies = response.headers.getall("Set-Cookie")
        token_cookie = next(c for c in cookies if c.startswith("edgekb_token="))
        assert "HttpOnly" in token_cookie and "SameSite=Strict" in token_cookie
        assert login["role"] == "admin" and login["csrf"]
        async with http.get(stack.url + "api/me") as response:
            assert (await response.json()) | {"expires": 0} == {
                "user": "alice", "role": "admin", "expires": 0, "via": "cookie"}
        # A plain form POST (what another site can make a browser send) carries no CSRF header.
        async with http.post(stack.url + "api/things", data={"x": "1"},
                             headers=origin) as response:
            status, body = await status_and_body(response)
            assert status == 403 and body["error"]["code"] == "csrf_required"
        async with http.post(stack.url + "api/things", data={"x": "1"},
                             headers={**origin, "X-CSRF-Token": "guess"}) as response:
            assert response.status == 403
        async with http.post(stack.url + "api/things", data={"x": "1"},
                             headers={**origin, "X-CSRF-Token": login["csrf"]}) as response:
            assert response.status == 200
        # A cookie-authenticated upgrade must come from an allowed page.
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await http.ws_connect(stack.url + "ws", protocols=(PROTOCOL,))
        async with http.ws_connect(stack.url + "ws", protocols=(PROTOCOL,),
                                   headers=origin) as ws:
            assert (await ws.receive_json())["user"] == "alice"
        # Logout revokes the token itself, not only the cookie.
        stolen = http.cookie_jar.filter_cookies(URL(stack.url))["edgekb_token"].value
        async with http.post(stack.url + "api/logout",
                             headers={**origin, "X-CSRF-Token": login["csrf"]}) as response:
            assert response.status == 200
        async with http.get(stack.url + "api/things",
                            headers={"Authorization": f"Bearer {stolen}"}) as response:
            status, body = await status_and_body(response)
            assert status == 401 and "revoked" in body["error"]["message"]
    assert PASSWORD not in stack.settings.audit_path.read_text()


async def test_a_cross_site_form_cannot_log_in(make_stack) -> None:
    stack = await make_stack()
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.url + "api/login", data={"name": "alice",
                                                            "password": PASSWORD}) as response:
            assert response.status == 401 and "application/json" in \
                (await response.json())["error"]["message"]
        async with http.post(stack.url + "api/login",
                             json={"name": "alice", "password": PASSWORD},
                             headers={"Origin": "https://evil.example"}) as response:
            assert response.status == 403


async def test_brute_forced_login_is_slowed_after_five_failures(make_stack) -> None:
    stack = await make_stack()
    async with aiohttp.ClientSession() as http:
        async def attempt(password: str) -> tuple[int, dict[str, Any]]:
            async with http.post(stack.url + "api/login",
                                 json={"name": "bob", "password": password}) as response:
                return await status_and_body(response)

        for n in range(5):
            status, body = await attempt(f"guess-{n}")
            assert status == 401 and body["error"]["code"] == "login_failed"
        status, body = await attempt(PASSWORD)  # even the right one must wait now: 1 s
        assert status == 429 and body["error"]["code"] == "rate_limited"
        assert 0 < body["error"]["retry_after"] <= 1
        await asyncio.sleep(body["error"]["retry_after"] + 0.1)
        status, body = await attempt("guess-5")
        assert status == 401
        status, body = await attempt(PASSWORD)  # the next wait is twice as long
        assert status == 429 and 1 < body["error"]["retry_after"] <= 2
        await asyncio.sleep(body["error"]["retry_after"] + 0.1)
        status, body = await attempt(PASSWORD)
        assert status == 200, body
    outcomes = [line["outcome"] for line in audit_lines(stack.settings.audit_path)
                if line["event"] == "login"]
    assert outcomes.count("login_failed") == 6 and outcomes.count("rate_limited") == 2
    assert outcomes[-1] == "ok"


async def test_auth_off_on_loopback_lets_requests_through_but_still_checks_origin(
        make_stack) -> None:
    stack = await make_stack(**{"auth.enabled": False})
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.url + "api/things", data=b"x") as response:
            assert response.status == 200
        async with http.post(stack.url + "api/things", data=b"x",
                             headers={"Origin": "https://evil.example"}) as response:
            assert response.status == 403


# --- connections and slow clients --------------------------------------------------------------

async def test_too_many_connections_from_one_address_get_a_typed_429(make_stack) -> None:
    stack = await make_stack(**{"limits.connections_per_address": 5})
    held = [await asyncio.open_connection("127.0.0.1", stack.port) for _ in range(5)]
    try:
        refused = await raw_request("127.0.0.1", stack.port,
                                    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert status_of(refused) == 429
        error = body_of(refused)["error"]
        assert error["code"] == "too_many_connections" and error["retry_after"] > 0
        assert b"Retry-After:" in refused
        # Another address of this machine is not held back by the first one's flood.
        other = await raw_request("127.0.0.1", stack.port,
                                  b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
                                  b"Connection: close\r\n\r\n", local_addr="127.0.0.2")
        assert status_of(other) == 200
    finally:
        for _, writer in held:
            writer.close()
    # The slots come back once the connections close.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        again = await raw_request("127.0.0.1", stack.port, b"GET /healthz HTTP/1.1\r\n"
                                  b"Host: localhost\r\nConnection: close\r\n\r\n")
        if status_of(again) == 200:
            break
        await asyncio.sleep(0.1)
    assert status_of(again) == 200
    refusals = await wait_for_audit(stack.settings.audit_path, {"event": "connection_refused"})
    assert refusals[0]["outcome"] == "too_many_connections"


async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, piece: bytes,
               count: int = 60) -> bytes:
    """Send ``piece`` every 0.1 s until the server answers; return the answer."""
    answer = asyncio.create_task(reader.read(65536))
    try:
        for _ in range(count):
            if answer.done():
                break
            writer.write(piece)
            await asyncio.sleep(0.1)
        return await asyncio.wait_for(answer, 5)
    finally:
        writer.close()


async def test_headers_that_drip_are_cut_off_with_a_typed_408(make_stack) -> None:
    stack = await make_stack(**{"limits.header_timeout_s": 1.0})
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    started = time.monotonic()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
    response = await drip(reader, writer, b"X-Drip: 1\r\n")  # 11 bytes a line, never done
    assert status_of(response) == 408 and body_of(response)["error"]["code"] == "too_slow"
    assert time.monotonic() - started < 3
    line = (await wait_for_audit(stack.settings.audit_path, {"event": "slow_client"}))[0]
    assert line["phase"] == "headers"


async def test_a_body_slower_than_the_minimum_rate_is_cut_off(make_stack) -> None:
    stack = await make_stack(**{"limits.body_timeout_s": 1.0, "limits.body_min_bytes_s": 500})
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    writer.write((f"POST /api/things HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n"
                  f"Authorization: Bearer {stack.token('admin')}\r\n\r\n").encode())
    started = time.monotonic()
    response = await drip(reader, writer, b"x" * 10)  # 100 bytes/s, a fifth of the minimum
    assert status_of(response) == 408, response
    assert json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_slow"
    assert time.monotonic() - started < 4


async def _tls_exchange(port: int, cafile: Path, request: bytes) -> bytes:
    """One request over TLS, driven through memory buffers so that the request leaves in the
    same write as the handshake's last flight (the client's Finished), as a quick client's
    often does; returns the answer's head (bounded in reads and time)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context(cafile=str(cafile)).wrap_bio(
        incoming, outgoing, server_hostname="localhost")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(20):  # a handshake is two or three round trips
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                writer.write(outgoing.read())
                data = await asyncio.wait_for(reader.read(65536), 5)
                assert data, "the server closed during the handshake"
                incoming.write(data)
        tls.write(request)
        writer.write(outgoing.read())  # Finished and the request, in one write
        answer = b""
        for _ in range(100):
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                break
            incoming.write(data)
            with contextlib.suppress(ssl.SSLWantReadError):
                while chunk := tls.read(65536):
                    answer += chunk
            if b"\r\n\r\n" in answer:
                break
        return answer
    finally:
        writer.close()


async def test_a_request_sent_with_the_tls_handshake_is_answered_at_once(
        make_stack, tmp_path: Path) -> None:
    cert, key = make_self_signed(tmp_path / "tls", [])
    stack = await make_stack(**{"tls.certificate": str(cert), "tls.private_key": str(key)})
    started = time.monotonic()
    answer = await _tls_exchange(stack.port, cert, b"GET /healthz HTTP/1.1\r\n"
                                 b"Host: localhost\r\nConnection: close\r\n\r\n")
    assert status_of(answer) == 200, answer[:200]
    assert time.monotonic() - started < 5  # not the header deadline's 408, 30 s later
