"""The security layer built from settings: start-up checks, the token authority, the audit
log, the access middleware's state, the guarded listening site and the question rate.

Shared by the server (create_app, serve) and the CLI (`edgekb token`, `users`), so both read
the same keys with the same rules.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import AsyncIterator

from aiohttp import web

from .access import ACCESS, Access
from .audit import AuditLog
from .config import Settings, split_list
from .connguard import ConnectionGuard, GuardedSite
from .errors import EdgekbError
from .limits import (
    ConnectionCounter,
    QuestionRate,
    connection_ceiling,
    open_fds,
    parse_networks,
    raise_fd_limit,
)
from .tls import server_context
from .tokens import token_authority

log = logging.getLogger(__name__)

AUDIT = web.AppKey("audit", AuditLog)
QUESTION_RATE = web.AppKey("question_rate", QuestionRate)


class AuthRequired(EdgekbError):
    """Listening beyond loopback with authentication off."""

    code = "auth_required"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:  # a name: loopback only if every address it resolves to is
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_exposure(settings: Settings) -> None:
    """Refuse to listen beyond loopback without authentication."""
    if not settings.auth.enabled and not is_loopback(settings.server.host):
        raise AuthRequired(
            f"server.host {settings.server.host} is reachable from other machines, but "
            "auth.enabled is false. Turn authentication on (remove auth.enabled: false, or "
            "--set auth.enabled=true) and sign in with `edgekb users add NAME --role admin` "
            "or a token from `edgekb token issue`; or bind to 127.0.0.1 for development")


def open_audit(settings: Settings) -> AuditLog:
    return AuditLog(settings.audit_path, settings.audit.max_mb * 2**20, settings.audit.keep,
                    settings.audit.question_text)


async def security_context(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: audit log, keys (made at the first start), the middleware's state."""
    from . import keys

    settings = app[keys.SETTINGS]
    check_exposure(settings)
    audit = open_audit(settings)
    app[AUDIT] = audit
    authority = token_authority(settings) if settings.auth.enabled else None
    app[ACCESS] = Access.create(settings, authority, audit, app.get(keys.STORE))
    app[QUESTION_RATE] = QuestionRate(settings.limits.questions_per_minute)
    audit.record("server_start", outcome="ok", auth=settings.auth.enabled,
                 tls=bool(settings.tls.certificate))
    yield
    audit.record("server_stop", outcome="ok")
    audit.close()


def guarded_site(runner: web.BaseRunner, settings: Settings, audit: AuditLog) -> GuardedSite:
    """The listening site: connection caps below the descriptor limit, TLS, slow clients."""
    fd_limit = raise_fd_limit()
    ceiling = connection_ceiling(settings.limits.connections_total, fd_limit, open_fds())
    if ceiling < settings.limits.connections_total:
        log.warning("at most %d connections: the file-descriptor limit is %d (raise "
                    "LimitNOFILE to allow limits.connections_total=%d)", ceiling, fd_limit,
                    settings.limits.connections_total)
    limits = settings.limits
    guard = ConnectionGuard(
        ConnectionCounter(limits.connections_per_address, ceiling),
        parse_networks(split_list(settings.auth.trusted_proxies)), audit,
        header_timeout_s=limits.header_timeout_s, body_timeout_s=limits.body_timeout_s,
        body_min_bytes_s=limits.body_min_bytes_s,
        ssl_context=server_context(settings.tls.certificate, settings.tls.private_key))
    return GuardedSite(runner, settings.server.host, settings.server.port, guard)
