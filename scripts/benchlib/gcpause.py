"""python -m benchlib.gcpause DATA_DIR: how long a full garbage collection holds a ready server.

The app is started as `edgekb serve` starts it (create_app, every cleanup_ctx start-up: store,
embedder, index, LLM), on a loopback port, in a process of its own. Then five full collections
are timed, the start-up heap frozen as serve freezes it (server.freeze_startup_heap), and five
more. One JSON line on stdout.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import sys
import time

from aiohttp.test_utils import TestServer

from edgekb.app import create_app
from edgekb.config import load_settings
from edgekb.server import freeze_startup_heap

ROUNDS = 5


def full_collections_ms() -> list[float]:
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - started) * 1000)
    return times


async def main(data_dir: str) -> dict[str, float | int]:
    settings = load_settings(overrides={"data_dir": data_dir, "auth.enabled": False})
    server = TestServer(create_app(settings), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        tracked = len(gc.get_objects())
        before = full_collections_ms()
        freeze_startup_heap()
        after = full_collections_ms()
        return {"tracked_objects": tracked, "frozen_objects": gc.get_freeze_count(),
                "full_collect_ms": round(statistics.median(before), 2),
                "full_collect_ms_max": round(max(before), 2),
                "full_collect_ms_frozen": round(statistics.median(after), 3)}
    finally:
        await server.close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))))
