"""Who a request comes from, by one rule for every transport (WebSocket and HTTP alike), so a
conversation asked over one is listed, renamed and deleted over the other."""

from __future__ import annotations

from aiohttp import web

from .access import PRINCIPAL


def user_of(request: web.Request) -> str:
    """The user a request acts for: the subject of the credential the access middleware
    admitted (with auth off on loopback, its stand-in principal)."""
    return request[PRINCIPAL].sub
