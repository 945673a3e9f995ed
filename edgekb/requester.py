"""Who is asking: the one place the HTTP transports (SSE, OpenAI) take the user and the
client's address from a request the access middleware admitted (access.py)."""

from __future__ import annotations

from aiohttp import web

from .access import CLIENT_ADDRESS, PRINCIPAL


def user_of(request: web.Request) -> str:
    """The user a conversation belongs to: the signed-in principal."""
    return request[PRINCIPAL].sub


def client_address(request: web.Request) -> str:
    """The client's IP address (X-Forwarded-For only from a trusted proxy), for the audit."""
    return request[CLIENT_ADDRESS]
