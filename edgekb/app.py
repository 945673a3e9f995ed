"""The application factory: each engine is one cleanup_ctx, loaded once, freed on shutdown.

A cleanup step runs only if its start-up finished, so a start-up that fails half-way (a corrupt
model, say) frees exactly what was loaded.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import WSCloseCode, web

from . import keys
from .answer import AnswerEngine
from .config import Settings
from .engines import load_embedder, load_llm, open_catalog, open_library, prompt_builder
from .retrieval import Searcher
from .store import AsyncStore
from .ws import websocket_handler

STATIC_DIR = Path(__file__).with_name("static")


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=settings.server.max_message_bytes)
    app[keys.SETTINGS] = settings
    app[keys.SOCKETS] = weakref.WeakSet()
    app.cleanup_ctx.extend([_store, _embedder, _library, _llm])
    app.on_shutdown.append(_close_sockets)
    app.router.add_get("/ws", websocket_handler)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/", _index_page)
    app.router.add_static("/static/", STATIC_DIR)
    return app


async def _in_thread(fn, *args):  # type: ignore[no-untyped-def]
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def _store(app: web.Application) -> AsyncIterator[None]:
    store = AsyncStore(app[keys.SETTINGS].db_path)
    app[keys.STORE] = store
    yield
    await _in_thread(store.close)


async def _embedder(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    catalog = await _in_thread(open_catalog, settings)
    app[keys.EMBEDDER] = await _in_thread(load_embedder, settings, catalog)
    yield


async def _library(app: web.Application) -> AsyncIterator[None]:
    library = open_library(app[keys.SETTINGS], app[keys.EMBEDDER])
    await app[keys.STORE].write(library.load)
    app[keys.LIBRARY] = library
    yield


async def _llm(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    catalog = await _in_thread(open_catalog, settings)
    llm, entry = await _in_thread(load_llm, settings, catalog)
    app[keys.LLM] = llm
    builder = await _in_thread(prompt_builder, settings, llm, entry)
    searcher = Searcher(app[keys.EMBEDDER], app[keys.LIBRARY])
    app[keys.ANSWERS] = AnswerEngine(app[keys.STORE], searcher, builder, llm)
    yield
    await _in_thread(llm.close)


async def _close_sockets(app: web.Application) -> None:
    for ws in set(app[keys.SOCKETS]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _index_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")
