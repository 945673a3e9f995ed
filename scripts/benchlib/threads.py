"""LLM thread count by measurement: decode speed with 1 and 2 threads, 0 / 100 / 1,000 followers.

For each `generation.threads` value a server is started on the demo data; one question is
answered with nobody else connected, then while 100 and 1,000 connections of the same session
follow it (the asker plus resumed followers, as benchlib.connections does). Each figure is the
asking client's tokens/s (first to last delta) / raw llama-cpp-python with the same thread count
on the same prompt, measured in this run while the server is idle.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from . import connections
from .common import Sheet, log, ratio
from .llm import BuiltPrompt, RawLlm
from .server import ask, connect, start_server, until_idle

FOLLOWERS = (0, 100, 1000)
THREADS = (1, 2)


async def run(sheet: Sheet, demo: Path, work: Path, settings: Any, prompt: BuiltPrompt,
              deterministic: tuple[str, ...]) -> dict[int, float | None]:
    """Returns, per thread count, the tokens/s ratio with 100 followers (the busy case)."""
    busy: dict[int, float | None] = {}
    for threads in THREADS:
        raw_settings = dataclasses.replace(settings, generation=dataclasses.replace(
            settings.generation, threads=threads))
        raw = RawLlm(raw_settings)
        try:
            raw.warm_up(prompt)
            raw_tps = raw.run(prompt, 0).tokens_per_s
        finally:
            raw.close()
        log(f"threads: server with generation.threads={threads} (raw {raw_tps or 0:.1f} tok/s)")
        server = start_server(demo, work / f"serve-threads{threads}.log", *deterministic,
                              f"generation.threads={threads}")
        try:
            async with connections.client_session(server.headers) as http:
                ws, _ = await connect(http, server.ws_url)
                await ask(ws, "warm", prompt.question)  # the first answer allocates buffers
                await ws.close()
                await until_idle(http, server)
                for followers in FOLLOWERS:
                    if followers:
                        lag = await connections.loop_lag(server, http, prompt.question,
                                                         followers, 1.0)
                        answer = lag["answer"]
                    else:
                        ws, _ = await connect(http, server.ws_url)
                        answer = await ask(ws, f"t{threads}", prompt.question)
                        await ws.close()
                    await until_idle(http, server)
                    value = ratio(answer.client_tokens_per_s(), raw_tps)
                    sheet.put(f"decode_ratio_threads{threads}_followers{followers}", value,
                              f"generation.threads={threads}: the asking client's tokens/s "
                              f"with {followers} connections following the answer / raw "
                              f"llama-cpp-python with {threads} thread(s) on the same prompt; "
                              "1 answer")
                    sheet.put(f"decode_tps_threads{threads}_followers{followers}",
                              answer.client_tokens_per_s(), "the tokens/s themselves", 1)
                    if followers == 100:
                        busy[threads] = value
        finally:
            server.stop()
    return busy
