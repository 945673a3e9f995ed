"""Who a request comes from, by one rule for every transport (WebSocket and HTTP alike), so a
conversation asked over one is listed, renamed and deleted over the other."""

from __future__ import annotations

from aiohttp import web


def user_of(request: web.Request) -> str:
    """The user a request acts for: its client address until authentication names users."""
    return request.remote or "local"
