"""Run the app until SIGINT/SIGTERM; say "ready" only once models and index are loaded."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from .app import create_app
from .config import Settings
from .datadir import exclusive
from .http_errors import AppRunner
from .security import AUDIT, guarded_site

# aiohttp's default keeps an idle keep-alive connection for an hour; nginx's default is 75 s.
KEEPALIVE_S = 75.0

log = logging.getLogger(__name__)


async def serve(settings: Settings) -> None:
    with exclusive(settings.data_dir, "edgekb serve"):
        app = create_app(settings)
        # Handlers close their sockets within ws.CLOSE_WAIT_S of the shutdown notice.
        runner = AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=10,
                           keepalive_timeout=KEEPALIVE_S)
        await runner.setup()  # runs every cleanup_ctx start-up: models, index, store
        try:
            # Connection caps, TLS and slow-client deadlines live in the site (connguard.py).
            site = guarded_site(runner, settings, app[AUDIT])
            await site.start()
            # Tests and scripts wait for this line (with the real port when port is 0).
            print(f"edgekb ready on {site.name}/", flush=True, file=sys.stderr)
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
