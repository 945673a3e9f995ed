"""Who may do what over HTTP and WebSocket: one middleware in front of every route.

In order, for each request:
1. the client's address (the socket's peer; X-Forwarded-For only from a trusted proxy);
2. Host: one of the names the appliance answers to, so a DNS-rebinding page (Host:
   evil.example resolving to us) cannot pose as same-origin;
3. Origin, on WebSocket upgrades and every state-changing request: the page's own origin or
   one in auth.allowed_origins (403 otherwise);
4. a credential, except on the public routes (/healthz, the page and its assets, the login):
   a JWT from `Authorization: Bearer`, the second entry of Sec-WebSocket-Protocol
   ("bearer.<token>", since browser JavaScript cannot set WebSocket headers), or the HttpOnly
   cookie of a page login; never from the URL query, where proxies and logs keep it. Missing
   or invalid: 401 with a typed body, and a WebSocket is never upgraded;
5. CSRF: a cookie-authenticated state-changing request must carry X-CSRF-Token equal to the
   token's csrf claim (a form POST from another site cannot set a header);
6. the route's role (admin for documents, users and reindexing; see ``requires``).
Every refusal is audited; so are state-changing requests and WebSocket connections.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiohttp import hdrs, web
from yarl import URL

from . import users
from .audit import AuditLog
from .config import Settings, split_list
from .connguard import GuardedProtocol
from .errors import EdgekbError
from .http_errors import status_of
from .limits import (
    ConnectionCounter,
    LoginThrottle,
    Network,
    RateLimited,
    ServerFull,
    TooManyConnections,
    _in,
    client_address,
    parse_networks,
    retry_after_header,
)
from .store import AsyncStore
from .tokens import Principal, TokenAuthority, Unauthorized

log = logging.getLogger(__name__)

TOKEN_COOKIE = "edgekb_token"
CSRF_COOKIE = "edgekb_csrf"
CSRF_HEADER = "X-CSRF-Token"
SUBPROTOCOL_PREFIX = "bearer."
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_PATHS = frozenset({"/healthz", "/", "/api/login"})
PUBLIC_PREFIXES = ("/static/",)
MAX_LOGIN_BODY = 4096
MAX_HOSTS_SEEN = 256
_LOCAL_USER = Principal("local", "admin", "", float("inf"), 0.0, via="none")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Set on every request by the middleware, for handlers and the audit trail.
REQUEST_ID = web.RequestKey("request_id", str)
CLIENT_ADDRESS = web.RequestKey("client_address", str)
PRINCIPAL = web.RequestKey("principal", Principal)
AUDIT_DETAILS = web.RequestKey("audit_details", dict)  # a handler's extra audit fields
CLOSE_CODE = web.RequestKey("close_code", int)  # the code a WebSocket handler closed with


class Forbidden(EdgekbError):
    code = "forbidden"


class ForbiddenOrigin(Forbidden):
    code = "forbidden_origin"


class CsrfRequired(Forbidden):
    code = "csrf_required"


class BadHost(EdgekbError):
    code = "bad_host"


class LoginFailed(EdgekbError):
    code = "login_failed"


def requires(role: str, audit: str = "") -> Callable[[Handler], Handler]:
    """Mark a handler with the role it needs and the audit event it leaves. Unmarked, safe
    methods need any signed-in user and the others an admin (secure by default)."""
    def mark(handler: Handler) -> Handler:
        handler.edgekb_role = role  # type: ignore[attr-defined]
        if audit:
            handler.edgekb_audit = audit  # type: ignore[attr-defined]
        return handler
    return mark


def error_response(exc: EdgekbError, request_id: str = "") -> web.Response:
    """The one error body (http_errors.py), with Retry-After and WWW-Authenticate."""
    status = status_of(exc)
    headers = {"X-Request-Id": request_id} if request_id else {}
    retry = exc.details.get("retry_after")
    if retry is not None:
        headers[hdrs.RETRY_AFTER] = retry_after_header(float(retry))
    if status == 401:
        headers[hdrs.WWW_AUTHENTICATE] = 'Bearer realm="edgekb"'
    return web.json_response({"error": exc.to_wire()}, status=status, headers=headers)


@dataclass
class Access:
    """Everything the middleware and the login routes share (one per application)."""

    settings: Settings
    authority: TokenAuthority | None  # None: auth.enabled is false (loopback only)
    audit: AuditLog
    store: AsyncStore | None = None
    trusted: list[Network] = field(default_factory=list)
    hostnames: frozenset[str] = frozenset()
    origins: frozenset[tuple[str, str, int]] = frozenset()
    public_paths: set[str] = field(default_factory=lambda: set(PUBLIC_PATHS))
    logins: LoginThrottle = field(default_factory=lambda: LoginThrottle(5))
    proxied: ConnectionCounter = field(default_factory=lambda: ConnectionCounter(20, 10**9))
    hasher: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        1, thread_name_prefix="password"))
    _hosts_seen: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def create(cls, settings: Settings, authority: TokenAuthority | None, audit: AuditLog,
               store: AsyncStore | None) -> Access:
        auth, limits = settings.auth, settings.limits
        names = {"localhost", *(n.lower() for n in split_list(auth.hostnames))}
        host = socket.gethostname().lower()
        names |= {host, f"{host}.local"}
        if not _is_ip(settings.server.host) and settings.server.host not in ("", "0.0.0.0"):
            names.add(settings.server.host.lower())
        origins = frozenset(o for o in (_origin_key(x) for x in split_list(auth.allowed_origins))
                            if o is not None)
        return cls(settings, authority, audit, store, parse_networks(
            split_list(auth.trusted_proxies)), frozenset(names), origins,
            logins=LoginThrottle(limits.login_failures),
            proxied=ConnectionCounter(limits.connections_per_address, 10**9))

    def principal(self, request: web.Request) -> Principal:
        if self.authority is None:
            return _LOCAL_USER
        for query_name in ("token", "access_token", "jwt"):
            if query_name in request.query:
                raise Unauthorized("tokens in the URL are not accepted (logs keep them): use "
                                   "the Authorization header, the login cookie or the "
                                   "bearer.<token> WebSocket subprotocol")
        header = request.headers.get(hdrs.AUTHORIZATION, "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized("the Authorization header must be 'Bearer <token>'")
            return self.authority.verify(token.strip(), "header")
        for offered in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, []):
            for proto in (p.strip() for p in offered.split(",")):
                if proto.startswith(SUBPROTOCOL_PREFIX):
                    return self.authority.verify(proto[len(SUBPROTOCOL_PREFIX):],
                                                 "subprotocol")
        cookie = request.cookies.get(TOKEN_COOKIE)
        if cookie:
            return self.authority.verify(cookie, "cookie")
        raise Unauthorized("sign in first: no credential was sent")

    def check_host(self, request: web.Request) -> None:
        host = request.headers.get(hdrs.HOST)
        if not host:
            raise BadHost("the request has no Host header")
        allowed = self._hosts_seen.get(host)
        if allowed is None:
            name = _host_name(host)
            allowed = name is not None and (_is_ip(name) or name in self.hostnames)
            if len(self._hosts_seen) >= MAX_HOSTS_SEEN:  # bounded: a scan of names
                self._hosts_seen.clear()
            self._hosts_seen[host] = allowed
        if not allowed:
            raise BadHost(f"this appliance does not answer to {host!r} (add it to "
                          "auth.hostnames)")

    def check_origin(self, request: web.Request, required: bool) -> None:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:
            if required:
                raise ForbiddenOrigin("a browser request without an Origin header")
            return
        key = _origin_key(origin)
        if key is not None and (key == self._own_origin(request) or key in self.origins):
            return
        raise ForbiddenOrigin(f"origin {origin!r} is not allowed (auth.allowed_origins)")

    def _own_origin(self, request: web.Request) -> tuple[str, str, int] | None:
        scheme = "https" if request.secure else "http"
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer and _in(str(peer[0]), self.trusted):
            scheme = request.headers.get("X-Forwarded-Proto", scheme).lower()
        return _origin_key(f"{scheme}://{request.headers.get(hdrs.HOST, '')}")


ACCESS = web.AppKey("access", Access)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _host_name(host: str) -> str | None:
    """The name of a Host header without its port; None when malformed."""
    try:
        url = URL(f"http://{host}")
    except ValueError:
        return None
    if url.host is None or url.path not in ("", "/") or url.user or url.query_string:
        return None
    return url.host.lower().rstrip(".")


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin, default ports filled in; None for "null" or junk."""
    try:
        url = URL(origin)
    except ValueError:
        return None
    if url.scheme not in ("http", "https") or not url.host or url.port is None:
        return None
    return url.scheme, url.host.lower().rstrip("."), url.port


def _is_upgrade(request: web.Request) -> bool:
    return request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    access: Access = request.app[ACCESS]
    request_id = secrets.token_hex(6)
    request[REQUEST_ID] = request_id
    peer = request.transport.get_extra_info("peername") if request.transport else None
    peer_address = str(peer[0]) if peer else "local"
    address = client_address(peer_address, request.headers, access.trusted)
    request[CLIENT_ADDRESS] = address
    guard = request.transport.get_protocol() if request.transport else None
    if isinstance(guard, GuardedProtocol):
        guard.request_started(request)
    try:
        return await _admit(access, request, handler, address, request_id)
    finally:
        if isinstance(guard, GuardedProtocol):
            guard.request_finished()


async def _admit(access: Access, request: web.Request, handler: Handler, address: str,
                 request_id: str) -> web.StreamResponse:
    user = ""
    try:
        if request.path != "/healthz":
            access.check_host(request)
        upgrade = _is_upgrade(request)
        changing = request.method not in SAFE_METHODS
        if upgrade or changing:
            access.check_origin(request, required=False)
        if request.path in access.public_paths or request.path.startswith(PUBLIC_PREFIXES):
            return await _handle(handler, request, request_id)
        principal = access.principal(request)
        user = principal.sub
        if principal.via == "cookie" and (upgrade or changing):
            access.check_origin(request, required=True)
        if principal.via == "cookie" and changing and not hmac.compare_digest(
                request.headers.get(CSRF_HEADER, ""), principal.csrf or "\0"):
            raise CsrfRequired(f"send the {CSRF_HEADER} header (the value of the "
                               f"{CSRF_COOKIE} cookie) with this request")
        target = request.match_info.handler
        role = getattr(target, "edgekb_role", "user" if not changing else "admin")
        if role == "admin" and not principal.is_admin:
            raise Forbidden(f"{request.method} {request.path} needs the admin role")
        request[PRINCIPAL] = principal
    except EdgekbError as exc:
        access.audit.record("refused", user=user, address=address, request=request_id,
                            outcome=exc.code, method=request.method, path=request.path,
                            reason=exc.message, coalesce=f"refused:{address}:{exc.code}")
        return error_response(exc, request_id)
    if upgrade:
        return await _websocket(access, request, handler, principal, address, request_id)
    response = await _handle(handler, request, request_id)
    if changing:
        event = getattr(request.match_info.handler, "edgekb_audit", "request")
        access.audit.record(event, user=principal.sub, address=address, request=request_id,
                            outcome=str(response.status), method=request.method,
                            path=request.path, bytes=request.content.total_bytes,
                            **request.get(AUDIT_DETAILS, {}))
    return response


async def _handle(handler: Handler, request: web.Request,
                  request_id: str) -> web.StreamResponse:
    """The handler's response; a typed error it raised (a body cut off as too slow, say)
    becomes its typed response here too."""
    try:
        response = await handler(request)
    except EdgekbError as exc:
        return error_response(exc, request_id)
    response.headers["X-Request-Id"] = request_id
    return response


async def _websocket(access: Access, request: web.Request, handler: Handler,
                     principal: Principal, address: str,
                     request_id: str) -> web.StreamResponse:
    """A WebSocket's life, audited; clients behind a trusted proxy capped by their address."""
    proxied = address != _peer(request)
    if proxied:
        try:
            access.proxied.acquire(address)
        except (TooManyConnections, ServerFull) as exc:
            access.audit.record("connection_refused", user=principal.sub, address=address,
                                request=request_id, outcome=exc.code,
                                coalesce=f"refused:{address}")
            return error_response(exc, request_id)
    access.audit.record("connect", user=principal.sub, address=address, request=request_id,
                        via=principal.via)
    started = time.monotonic()
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        return response
    finally:
        if proxied:
            access.proxied.release(address)
        code = request.get(CLOSE_CODE, getattr(response, "close_code", None))
        access.audit.record("disconnect", user=principal.sub, address=address,
                            request=request_id, outcome=str(code),
                            seconds=round(time.monotonic() - started, 1))


def _peer(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return str(peer[0]) if peer else "local"


# --- the login routes ------------------------------------------------------------------------

async def login(request: web.Request) -> web.Response:
    """POST /api/login {"name", "password"} -> the HttpOnly token cookie and a CSRF token."""
    access: Access = request.app[ACCESS]
    address = request[CLIENT_ADDRESS]
    request_id = request[REQUEST_ID]
    if access.authority is None or access.store is None:
        return error_response(EdgekbError("sign-in is off (auth.enabled is false)"),
                              request_id)
    try:
        access.logins.check(address)
        name, password = await _credentials(request)
    except RateLimited as exc:
        access.audit.record("login", address=address, request=request_id, outcome=exc.code,
                            coalesce=f"login:{address}")
        return error_response(exc, request_id)
    except EdgekbError as exc:
        return error_response(exc, request_id)
    loop = asyncio.get_running_loop()
    row = await access.store.read(lambda store: users.password_row(store, name))
    user = await loop.run_in_executor(access.hasher, users.check_login, row, password)
    if user is None:
        access.logins.failed(address)
        access.audit.record("login", user=name, address=address, request=request_id,
                            outcome="login_failed")
        return error_response(LoginFailed("wrong name or password"), request_id)
    access.logins.succeeded(address)
    csrf = secrets.token_urlsafe(18)
    ttl = access.settings.auth.page_login_hours * 3600
    token, principal = access.authority.issue(user.name, user.role, ttl, csrf=csrf)
    access.audit.record("login", user=user.name, address=address, request=request_id,
                        outcome="ok", role=user.role)
    response = web.json_response({"user": user.name, "role": user.role,
                                  "expires": principal.expires, "csrf": csrf})
    secure = request.secure or access.settings.tls.certificate != ""
    response.set_cookie(TOKEN_COOKIE, token, max_age=int(ttl), path="/", httponly=True,
                        samesite="Strict", secure=secure)
    response.set_cookie(CSRF_COOKIE, csrf, max_age=int(ttl), path="/", samesite="Strict",
                        secure=secure)
    return response


async def _credentials(request: web.Request) -> tuple[str, str]:
    # JSON only: a cross-site form cannot send application/json without a CORS preflight.
    if request.content_type != "application/json":
        raise LoginFailed("send the login as application/json {\"name\", \"password\"}")
    if (request.content_length or 0) > MAX_LOGIN_BODY:
        raise LoginFailed("the login request is too large")
    try:
        body = await request.json()
    except ValueError:
        raise LoginFailed("the login body is not valid JSON") from None
    name, password = (body.get("name"), body.get("password")) if isinstance(body, dict) \
        else (None, None)
    if not isinstance(name, str) or not isinstance(password, str):
        raise LoginFailed("name and password must be strings")
    return name, password


@requires("user", audit="logout")
async def logout(request: web.Request) -> web.Response:
    """End this login: its token is revoked (not only its cookie cleared)."""
    access: Access = request.app[ACCESS]
    principal = request[PRINCIPAL]
    if access.authority is not None and principal.jti:
        authority = access.authority
        await asyncio.get_running_loop().run_in_executor(
            None, authority.revoke_token, principal.jti, principal.expires)
    response = web.json_response({"user": principal.sub, "signed_out": True})
    response.del_cookie(TOKEN_COOKIE, path="/")
    response.del_cookie(CSRF_COOKIE, path="/")
    return response


async def whoami(request: web.Request) -> web.Response:
    """GET /api/me: who the credential belongs to (the page asks before connecting)."""
    principal = request[PRINCIPAL]
    return web.json_response({"user": principal.sub, "role": principal.role,
                              "expires": principal.expires if principal.jti else None,
                              "via": principal.via})


def add_login_routes(app: web.Application) -> None:
    app.router.add_post("/api/login", login)
    app.router.add_post("/api/logout", logout)
    app.router.add_get("/api/me", whoami)
