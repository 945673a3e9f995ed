"""A separate process that measures the server's event-loop lag with application pings.

Run as `python -m benchlib.pinger WS_URL INTERVAL_S MAX_S`. It prints "ready" once connected,
then sends `{"type":"ping"}` every INTERVAL_S and times each `pong`, until a line arrives on stdin
(or MAX_S passes); then it prints one JSON list of [monotonic send time, round trip ms].
A process of its own so the benchmark's many client sockets do not delay its own loop; the
monotonic clock is system-wide, so the parent can cut the samples into windows.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time

import aiohttp

PING = json.dumps({"type": "ping"})


async def measure(url: str, interval: float, max_s: float) -> list[list[float]]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def wait_for_stdin() -> None:
        sys.stdin.readline()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_for_stdin, daemon=True).start()
    samples: list[list[float]] = []
    token = os.environ.get("EDGEKB_TOKEN", "")  # passed by the bench, never on the command line
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as http:
        ws = await http.ws_connect(url, protocols=("edgekb.v2",))
        await ws.receive(timeout=30)  # welcome
        print("ready", flush=True)
        deadline = time.monotonic() + max_s
        while not stop.is_set() and time.monotonic() < deadline:
            sent = time.monotonic()
            await ws.send_str(PING)
            for _ in range(100):  # skip anything that is not our pong (bounded)
                msg = await ws.receive(timeout=30)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise RuntimeError(f"pinger connection ended: {msg.type}")
                if json.loads(msg.data).get("type") == "pong":
                    break
            rtt = time.monotonic() - sent
            samples.append([sent, rtt * 1000])
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, interval - rtt))
            except asyncio.TimeoutError:
                pass
        await ws.close()
    return samples


def main() -> None:
    url, interval, max_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    print(json.dumps(asyncio.run(measure(url, interval, max_s))), flush=True)


if __name__ == "__main__":
    main()
