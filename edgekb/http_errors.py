"""One error body for every HTTP error: ``{"error": {"code", "message", ...}}``.

Three sources of errors, one shape: our typed errors (EdgekbError), aiohttp's own HTTP errors
(404 no route, 405, 413 body too large), and anything unexpected (500, logged, never a
traceback to the client). Requests that fail in aiohttp's parser (a broken request line or
header) never reach a middleware; ``AppRunner`` below gives them the same JSON body.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .errors import EdgekbError

log = logging.getLogger(__name__)

STATUS_BY_CODE = {
    "not_found": 404, "too_large": 413, "invalid_kb": 400, "bad_upload": 400,
    "unauthorized": 401, "forbidden": 403, "rate_limited": 429, "busy": 503,
    "unavailable": 503, "disk_full": 507, "storage_error": 507, "internal": 500,
    "no_documents": 400,
    # the access layer (access.py, connguard.py)
    "login_failed": 401, "forbidden_origin": 403, "csrf_required": 403, "bad_host": 400,
    "too_many_connections": 429, "server_full": 503, "too_slow": 408, "invalid_user": 400,
    "unknown_user": 404,
}
CODE_BY_STATUS = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 408: "timeout", 413: "too_large", 415: "unsupported_media_type",
    429: "rate_limited", 500: "internal", 503: "unavailable",
}


def error_response(status: int, code: str, message: str, **details: Any) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, **details}},
                             status=status)


def status_of(error: EdgekbError) -> int:
    return STATUS_BY_CODE.get(error.code, 400)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except EdgekbError as exc:
        response = web.json_response({"error": exc.to_wire()}, status=status_of(exc))
        if "retry_after" in exc.details:
            response.headers["Retry-After"] = str(max(1, round(exc.details["retry_after"])))
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are answers, not errors
        response = error_response(exc.status, CODE_BY_STATUS.get(exc.status, "http_error"),
                                  exc.reason)
        for header in ("Allow", "Retry-After", "WWW-Authenticate"):
            if header in exc.headers:
                response.headers[header] = exc.headers[header]
        return response
    except (asyncio.CancelledError, ConnectionError):
        raise  # the client went away: nobody to answer
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal", "internal error")


class _JsonErrorRequestHandler(RequestHandler):
    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; may refuse (data sent)
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        text = message if message and status != 500 else phrase or "error"
        response = error_response(status, CODE_BY_STATUS.get(status, "http_error"), text)
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """aiohttp's AppRunner whose connections answer parser errors in our JSON shape (checked
    by tests against aiohttp 3.14; the hook is RequestHandler.handle_error)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server
        return server
