"""The application factory: each engine is one cleanup_ctx, loaded once, freed on shutdown.

A cleanup step runs only if its start-up finished, so a start-up that fails half-way (a corrupt
model, say) frees exactly what was loaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import WSCloseCode, web

from . import events, keys, sessions
from .access import access_middleware, add_login_routes
from .answer import AnswerEngine, AnswerOptions, Answers
from .api import setup_api
from .config import Settings
from .conversations import Conversations
from .cpugate import CpuGate
from .engines import (
    load_embedder,
    load_llm,
    make_ingestor,
    open_catalog,
    open_library,
    prompt_builder,
)
from .health import setup_health
from .http_errors import error_middleware
from .ingest_service import IngestService
from .llm import LlmEngine
from .llm_remote import RemoteLlm
from .metrics import Metrics
from .notices import broadcast
from .openai_api import openai_error_shape, setup_openai
from .page_api import setup_page_api
from .retrieval import Searcher
from .scheduler import FairQueue
from .security import AUDIT, QUESTION_RATE, security_context
from .sse import close_streams, setup_sse
from .store import AsyncStore
from .ws import sweep, websocket_handler

STATIC_DIR = Path(__file__).with_name("static")
log = logging.getLogger(__name__)


def create_app(settings: Settings, answers: Answers | None = None) -> web.Application:
    """The appliance. With ``answers`` (the tests' scripted engine) no model is loaded: the
    conversation core and the transports run on it, and the document API is unavailable."""
    # The access middleware comes before any handler: nothing runs for a request it refuses.
    # openai_error_shape wraps it: it reshapes every error body of /v1 the layers inside made,
    # the access layer's refusals included.
    app = web.Application(client_max_size=settings.server.max_message_bytes,
                          middlewares=[openai_error_shape, access_middleware, error_middleware])
    app[keys.SETTINGS] = settings
    app[keys.METRICS] = Metrics()
    app[keys.CONNECTIONS] = set()  # each handler removes its own when it ends
    # security_context refuses an unsafe exposure before any model is loaded.
    app.cleanup_ctx.extend([_store, security_context])
    if answers is None:
        app.cleanup_ctx.extend([_embedder, _library, _ingest, _llm])
    else:
        app[keys.ANSWERS] = answers
    app.cleanup_ctx.extend([_conversations, sweep])
    app.on_shutdown.extend([close_streams, _close_sockets])  # streams end before the answers
    app.router.add_get("/ws", websocket_handler)
    app.router.add_get("/api/status", _status)
    setup_health(app)
    setup_api(app)
    setup_sse(app)
    setup_openai(app)
    setup_page_api(app)
    add_login_routes(app)
    app.router.add_get("/", _index_page)
    app.router.add_static("/static/", STATIC_DIR)
    return app


async def _in_thread(fn, *args):  # type: ignore[no-untyped-def]
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def _store(app: web.Application) -> AsyncIterator[None]:
    store = AsyncStore(app[keys.SETTINGS].db_path)
    # Opens the writer now, so a schema from a newer edgekb stops start-up, and clears what an
    # interrupted ingest left unpublished.
    purged = await store.write(lambda db: db.purge_unpublished())
    if purged:
        log.warning("removed %d half-ingested documents left by the last run", purged)
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
    store = app[keys.STORE]
    await store.read(lambda db: library.load(db, store.write_from_thread))
    app[keys.LIBRARY] = library
    yield


async def _ingest(app: web.Application) -> AsyncIterator[None]:
    settings, embedder, library = app[keys.SETTINGS], app[keys.EMBEDDER], app[keys.LIBRARY]
    writer = app[keys.STORE].write_from_thread
    service = IngestService(lambda reads: make_ingestor(settings, reads, embedder, library,
                                                        writer), settings.db_path)
    app[keys.INGEST] = service
    yield
    await _in_thread(service.close)


async def _llm(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    catalog = await _in_thread(open_catalog, settings)
    llm, entry = await _in_thread(load_llm, settings, catalog)
    app[keys.LLM] = llm
    builder = await _in_thread(prompt_builder, settings, llm, entry)
    searcher = Searcher(app[keys.EMBEDDER], app[keys.LIBRARY])
    if isinstance(llm, LlmEngine):  # decode steps and embedding runs take turns on the cores
        gate = CpuGate()
        llm.set_step_gate(gate.decode_step)
        app[keys.EMBEDDER].gate = gate.embedding
    answers = AnswerEngine(app[keys.STORE], searcher, builder, llm)
    app[keys.ANSWERS] = answers
    warming = asyncio.create_task(_warm(answers))
    yield
    warming.cancel()  # stops the read at its next step
    await asyncio.gather(warming, return_exceptions=True)
    await _in_thread(answers.close)
    if isinstance(llm, RemoteLlm):
        await llm.aclose()
    else:
        await _in_thread(llm.close)


async def _warm(answers: AnswerEngine) -> None:
    started = time.perf_counter()
    try:
        read = await answers.warm()
    except Exception:  # the answers themselves still work, only their first read is longer
        log.exception("reading the shared prompt head failed")
        return
    if read:
        log.info("read the prompt head every answer shares (%d tokens) into every slot in "
                 "%.1f s", read, time.perf_counter() - started)


async def _conversations(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    store = app[keys.STORE]
    interrupted = await store.write(sessions.interrupt_running)
    if interrupted:
        log.warning("%d answers were cut off by the last shutdown; they end with an error",
                    interrupted)
    options = AnswerOptions.from_settings(settings)
    # As many answers at once as the LLM decodes together.
    queue = FairQueue(settings.queue.max_waiting, settings.queue.max_per_user,
                      slots=settings.generation.slots)
    conversations = Conversations(store, app[keys.ANSWERS], queue, options,
                                  grace_s=settings.sessions.grace_s, data_dir=settings.data_dir,
                                  min_free_bytes=settings.storage.min_free_mb * 2**20,
                                  metrics=app[keys.METRICS],
                                  question_rate=app[QUESTION_RATE], audit=app[AUDIT])
    app[keys.CONVERSATIONS] = conversations
    yield
    await conversations.close()


async def _close_sockets(app: web.Application) -> None:
    """Tell every client to resume later and give the notice a moment to leave; stop sending
    answers, end the running ones (their logs close with `interrupted`, which clients get by
    resuming after the restart), then close every socket."""
    await broadcast(app, events.notice("shutdown", "the server is going down; resume in a moment"))
    await asyncio.sleep(0.2)
    connections = list(app[keys.CONNECTIONS])
    await asyncio.gather(*(conn.close_followers() for conn in connections))
    await app[keys.CONVERSATIONS].close()
    for conn in connections:
        conn.end(WSCloseCode.GOING_AWAY, b"server shutting down")


async def _status(request: web.Request) -> web.Response:
    app = request.app
    return web.json_response({**app[keys.CONVERSATIONS].status(),
                              "connections": len(app[keys.CONNECTIONS])})


async def _index_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")
