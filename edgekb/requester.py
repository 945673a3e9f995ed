"""Who is asking: the one place every transport (WebSocket, SSE, OpenAI) takes the user and
the client's address from a request, so authentication changes them here and nowhere else."""

from __future__ import annotations

from aiohttp import web


def user_of(request: web.Request) -> str:
    """The user a conversation belongs to."""
    return request.remote or "local"  # until authentication names users


def client_address(request: web.Request) -> str:
    """The client's IP address as the server sees it."""
    return request.remote or ""
