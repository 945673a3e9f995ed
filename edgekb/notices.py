"""Broadcast notices (knowledge base updated, server going down) to every connection."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import web

from . import keys
from .events import encode


async def broadcast(app: web.Application, message: dict[str, Any]) -> None:
    """One frame to every connection; one whose outbox is full skips it rather than block."""
    frame = encode(message)
    for conn in list(app[keys.CONNECTIONS]):
        with contextlib.suppress(asyncio.QueueFull):
            conn.outbox.put_nowait(frame)
