"""Run the app until SIGINT/SIGTERM; say "ready" only once models and index are loaded."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiohttp import web

from .app import create_app
from .config import Settings
from .datadir import exclusive
from .http_errors import AppRunner

log = logging.getLogger(__name__)


async def serve(settings: Settings) -> None:
    with exclusive(settings.data_dir, "edgekb serve"):
        app = create_app(settings)
        # Handlers close their sockets within ws.CLOSE_WAIT_S of the shutdown notice.
        runner = AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=10)
        await runner.setup()  # runs every cleanup_ctx start-up: models, index, store
        try:
            site = web.TCPSite(runner, settings.server.host, settings.server.port)
            await site.start()
            port = runner.addresses[0][1]
            # Tests and scripts wait for this line (with the real port when port is 0).
            print(f"edgekb ready on http://{settings.server.host}:{port}/", flush=True,
                  file=sys.stderr)
            await _until_signal()
            log.info("shutting down")
        finally:
            await runner.cleanup()


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
