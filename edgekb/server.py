"""Run the app until SIGINT/SIGTERM; say "ready" only once models and index are loaded.

Under systemd (Type=notify) start-up reports each step as STATUS=, READY=1 once the site
listens, STOPPING=1 on shutdown, and WATCHDOG=1 keep-alives from the event loop throughout.
With socket activation (systemd/edgekb.socket) the listening socket comes from systemd.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from . import boards, keys, retention
from .app import create_app
from .backup import before_migrating
from .config import Settings
from .datadir import exclusive
from .http_errors import AppRunner
from .sdnotify import Notifier, Watchdog, watchdog_interval_s
from .security import AUDIT, guarded_site
from .store import Store

# aiohttp's default keeps an idle keep-alive connection for an hour; nginx's default is 75 s.
KEEPALIVE_S = 75.0

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
# What each start-up step of create_app does, for systemctl status (STATUS=).
_STEPS = {"_store": "opening the database", "_embedder": "verifying and loading the embedder",
          "_library": "loading the vector index", "_ingest": "starting the ingest thread",
          "_llm": "verifying and loading the LLM", "_conversations": "restoring conversations",
          "sweep": "starting the connection heartbeats"}


async def serve(settings: Settings) -> None:
    notifier = Notifier.from_env()
    watchdog = Watchdog(notifier, watchdog_interval_s())
    watchdog.start()  # model loading runs in threads: the loop stays free to ping
    board = boards.small_board_defaults(settings.models.small_board_mb)
    if board is not None:  # why this server writes fewer answers at once than a bigger one
        log.info("defaults of a small board from %s: generation.slots=%d, "
                 "generation.state_cache_mb=%d", board[0], settings.generation.slots,
                 settings.generation.state_cache_mb)
    try:
        with exclusive(settings.data_dir, "edgekb serve"):
            await _prepare_database(settings, notifier)
            app = create_app(settings)
            _announce_steps(app, notifier)
            app.cleanup_ctx.append(_retention_sweeper)
            # Handlers close their sockets within ws.CLOSE_WAIT_S of the shutdown notice.
            runner = AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=10,
                               keepalive_timeout=KEEPALIVE_S)
            await runner.setup()  # runs every cleanup_ctx start-up: models, index, store
            freeze_startup_heap()
            try:
                # Connection caps, TLS and slow-client deadlines live in the site
                # (connguard.py), on systemd's socket when it passed one.
                site = guarded_site(runner, settings, app[AUDIT], _systemd_socket())
                await site.start()
                address = f"{site.name}/"
                # Tests and scripts wait for this line (with the real port when port is 0).
                print(f"edgekb ready on {address}", flush=True, file=sys.stderr)
                notifier.ready(f"serving on {address}")
                await _until_signal()
                log.info("shutting down")
                notifier.stopping("shutting down: ending answers, closing connections")
            finally:
                await runner.cleanup()
    finally:
        watchdog.stop()
        notifier.close()


def freeze_startup_heap() -> None:
    """Keep what start-up made out of the garbage collector's sight: modules, settings, the
    models' Python objects (about 90,000 objects) live as long as the process, and a full
    collection that walks them holds the event loop for 20-30 ms on two slow cores, a stall
    every follower of an answer feels (scripts/bench: gc_full_collect_ms)."""
    gc.collect()  # what start-up left as garbage goes first, so none of it is kept for good
    gc.freeze()


async def _prepare_database(settings: Settings, notifier: Notifier) -> None:
    """Before anything opens the store: refuse a newer schema, back up before a migration,
    and compact a database that is mostly free pages (nothing is served yet)."""
    loop = asyncio.get_running_loop()
    floor = settings.storage.min_free_mb
    notifier.status("checking the database schema")
    backup = await loop.run_in_executor(None, before_migrating, settings, floor)
    if backup is not None:
        notifier.status(f"kept a backup before the schema migration: {backup}")
    if settings.db_path.is_file():
        notifier.status("compacting the database if it is mostly free space")

        def compact() -> None:
            store = Store(settings.db_path)
            try:
                retention.compact_if_fragmented(store, settings.data_dir, floor)
            finally:
                store.close()

        await loop.run_in_executor(None, compact)


def _announce_steps(app: web.Application, notifier: Notifier) -> None:
    """Wrap each cleanup_ctx start-up so that systemd's STATUS= names the step."""
    def announced(step: Callable[[web.Application], Any]) -> Any:
        async def wrapper(app: web.Application) -> AsyncIterator[None]:
            notifier.status(_STEPS.get(step.__name__, step.__name__.strip("_")))
            async for _ in step(app):
                yield

        return wrapper

    app.cleanup_ctx[:] = [announced(step) for step in app.cleanup_ctx]


async def _retention_sweeper(app: web.Application) -> AsyncIterator[None]:
    conversations = app[keys.CONVERSATIONS]

    def idle() -> bool:
        status = conversations.status()
        return status["llm"] == "idle" and status["queued"] == 0

    sweeper = retention.Sweeper(app[keys.STORE], app[keys.SETTINGS].retention, idle)
    task = asyncio.create_task(sweeper.run())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _systemd_socket() -> socket.socket | None:
    """The listening socket systemd passed (socket activation), else None."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or \
            int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    sock.setblocking(False)
    return sock


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
