"""The raw-library baseline for idle connections: a bare aiohttp WebSocket server.

Run as `python -m benchlib.rawws`; prints its port, then serves until SIGTERM. Each connection
gets one welcome-sized JSON frame and aiohttp's own heartbeat (20 s, edgekb's default interval),
then is held idle, which is what aiohttp alone costs per connection.
"""

from __future__ import annotations

import asyncio
import json
import signal

from aiohttp import web

WELCOME = json.dumps({"type": "welcome", "protocol": "edgekb.v2", "session": "x" * 22})


async def handler(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=("edgekb.v2",), heartbeat=20.0)
    await ws.prepare(request)
    await ws.send_str(WELCOME)
    async for _ in ws:  # ends when the peer closes
        pass
    return ws


async def serve() -> None:
    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(serve())
