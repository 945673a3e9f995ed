"""HTTP routes the web page needs beside the WebSocket: a user's conversations (list, one with
its running requests, rename, delete), what an empty page offers, and the page's service worker.

A transport: each route turns a request into one call of the conversation core (or one read of
the store) and its answer into JSON. Errors get the one body of http_errors.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp import web

from . import keys
from .access import requires
from .errors import NotFound, ProtocolError
from .examples import overview
from .identity import user_of
from .protocol import BAD_JSON, INVALID_FIELD, TOO_LARGE, valid_session_id

STATIC_DIR = Path(__file__).with_name("static")
MAX_BODY = 4096


def setup_page_api(app: web.Application) -> None:
    """Routes; call before the static route (``/static/sw.js`` is served here)."""
    app.router.add_get("/api/sessions", list_sessions)
    app.router.add_get("/api/sessions/{session}", get_session)
    app.router.add_patch("/api/sessions/{session}", rename_session)
    app.router.add_delete("/api/sessions/{session}", delete_session)
    app.router.add_get("/api/examples", examples)
    app.router.add_get("/static/sw.js", service_worker)


def _session_id(request: web.Request) -> str:
    session = request.match_info["session"]
    if not valid_session_id(session):
        raise NotFound(f"no conversation {session!r} of yours")
    return session


async def list_sessions(request: web.Request) -> web.Response:
    found = await request.app[keys.CONVERSATIONS].sessions(user_of(request))
    return web.json_response({"sessions": [s.to_wire() for s in found]})


async def get_session(request: web.Request) -> web.Response:
    info, running = await request.app[keys.CONVERSATIONS].session(user_of(request),
                                                                  _session_id(request))
    return web.json_response({"session": info.to_wire(), "running": running})


@requires("user", audit="rename_session")
async def rename_session(request: web.Request) -> web.Response:
    session = _session_id(request)
    body = await _json_object(request)
    title = body.get("title")
    if title is not None and not isinstance(title, str):
        raise ProtocolError(INVALID_FIELD, "title: expected a string (or null)", field="title")
    info = await request.app[keys.CONVERSATIONS].rename(user_of(request), session, title)
    return web.json_response({"session": info.to_wire()})


@requires("user", audit="delete_session")
async def delete_session(request: web.Request) -> web.Response:
    session = _session_id(request)
    await request.app[keys.CONVERSATIONS].delete(user_of(request), session)
    return web.json_response({"deleted": session})


async def examples(request: web.Request) -> web.Response:
    return web.json_response(await request.app[keys.STORE].read(overview))


async def service_worker(request: web.Request) -> web.FileResponse:
    # Served from /static/ but controlling the whole page: the header widens its scope.
    return web.FileResponse(STATIC_DIR / "sw.js", headers={
        "Service-Worker-Allowed": "/", "Cache-Control": "no-cache"})


async def _json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise ProtocolError(INVALID_FIELD, "send a JSON object (application/json)",
                            field="body")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise ProtocolError(TOO_LARGE, f"the body exceeds {MAX_BODY} bytes")
    try:
        body = json.loads(raw)
    except ValueError:
        raise ProtocolError(BAD_JSON, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ProtocolError(BAD_JSON, "the body must be a JSON object")
    return body
