"""Memory: where it goes (benchlib.memory, component by component) and on a 1 GB board.

Two breakdowns, each in a process of its own: the default settings on this machine, and what a
1 GB board gets by default (the small-board LLM and edgekb/profiles/board-1gb.yaml's generation
settings, boards.py). Then a real server with a 1 GB board's defaults: VmRSS when it is ready,
and VmHWM after it answered the demo questions (new sessions, follow-ups, several at once),
against the targets of a 1 GB board.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from .common import Sheet, benchlib_env, edgekb_env, log
from .llm import FOLLOW_UPS, QUESTIONS
from .server import ask, connect, ingest_demo, start_server, until_idle

# This VM has far more memory: with the threshold above it, edgekb chooses its defaults as it
# does on a board below models.small_board_mb.
SMALL_BOARD = "models.small_board_mb=100000000"


def _child_env() -> dict[str, str]:
    """A benchlib child's environment, without a settings file of the caller's."""
    return {k: v for k, v in {**edgekb_env(), **benchlib_env()}.items() if k != "EDGEKB_CONFIG"}


def breakdown(data_dir: Path, *settings: str) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "benchlib.memory", str(data_dir), *settings],
                            env=_child_env(), capture_output=True, text=True, timeout=900,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"benchlib.memory failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _put_breakdown(sheet: Sheet, parts: dict[str, Any], suffix: str, label: str) -> None:
    growth = parts["growth_mb"]
    weights = parts["gguf_resident_mb"]["after_answers"]
    sheet.put(f"rss_python_mb{suffix}", parts["rss_mb"]["edgekb_modules"],
              f"{label}: VmRSS of the interpreter with aiohttp, numpy, onnxruntime, llama_cpp, "
              "hnswlib and edgekb's modules imported", 1)
    sheet.put(f"rss_onnxruntime_mb{suffix}", growth["onnxruntime_session"]
              + growth["onnxruntime_first_query"] + growth["onnxruntime_ingest_batch"],
              f"{label}: growth from the embedder's onnxruntime session, its first query and an "
              "ingest-sized batch (the arena)", 1)
    sheet.put(f"rss_llm_weights_mb{suffix}", weights,
              f"{label}: resident part of the GGUF file's mapping after answers", 1)
    sheet.put(f"rss_llm_context_mb{suffix}", growth["llm_weights_and_context"] - weights
              + growth["first_answer"],
              f"{label}: the LLM's growth beyond its weights after a first answer (KV cache of "
              "every slot, compute buffers, logits, the repacked weights)", 1)
    sheet.put(f"rss_state_cache_mb{suffix}", parts["state_cache_mb"],
              f"{label}: KV snapshots the state cache held after answers of several sessions "
              f"(budget {parts['state_cache_budget_mb']} MB)", 1)
    sheet.put(f"rss_sqlite_index_mb{suffix}", growth["sqlite_and_index"],
              f"{label}: growth from opening SQLite and loading the vector index (demo data)", 1)
    sheet.put(f"rss_malloc_trim_mb{suffix}", -growth["after_malloc_trim"],
              f"{label}: what malloc_trim(0) gave back after those answers", 1)
    sheet.detail(f"rss_breakdown{suffix}", parts)


async def _answer_some(url: str, http: aiohttp.ClientSession, server: Any) -> None:
    """New sessions, a follow-up conversation, then several questions at once."""
    ws, _ = await connect(http, url)
    for n, question in enumerate(FOLLOW_UPS[0]):
        await ask(ws, f"p{n}", question)
    await ws.close()
    await until_idle(http, server)
    sockets = [s for s, _ in await asyncio.gather(*(connect(http, url) for _ in QUESTIONS[:4]))]
    await asyncio.gather(*(ask(s, f"c{n}", q) for n, (s, q) in enumerate(zip(sockets,
                                                                             QUESTIONS[:4]))))
    for s in sockets:
        await s.close()
    await until_idle(http, server)


def _put_gc_pause(sheet: Sheet, data_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "benchlib.gcpause", str(data_dir)],
                            env=_child_env(),
                            capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"benchlib.gcpause failed:\n{result.stderr[-3000:]}")
    pause = json.loads(result.stdout.strip().splitlines()[-1])
    sheet.put("gc_full_collect_ms", pause["full_collect_ms"],
              f"a full garbage collection in a ready server (default settings, demo data): "
              f"median of 5, max {pause['full_collect_ms_max']}; it walks "
              f"{pause['tracked_objects']} start-up objects and holds the event loop meanwhile",
              1)
    sheet.put("gc_full_collect_ms_frozen", pause["full_collect_ms_frozen"],
              f"the same after serve's freeze of the start-up heap "
              f"({pause['frozen_objects']} objects): what a collection costs the loop now")


async def run(sheet: Sheet, work: Path, quick: bool) -> None:
    demo = work / "memory-demo"
    ingest_demo(demo)
    log("memory: component breakdown, default settings")
    _put_breakdown(sheet, breakdown(demo), "", "default settings")
    log("memory: component breakdown, a 1 GB board's defaults")
    _put_breakdown(sheet, breakdown(demo, SMALL_BOARD), "_1gb", "a 1 GB board's defaults")
    log("memory: a full garbage collection in a ready server, with and without the freeze")
    _put_gc_pause(sheet, demo)
    log("memory: a server with a 1 GB board's defaults")
    server = start_server(demo, work / "serve-1gb.log", "generation.temperature=0", SMALL_BOARD)
    board = "a 1 GB board's defaults (the small-board LLM, board-1gb.yaml's generation settings)"
    try:
        sheet.put("rss_startup_mb_1gb", server.rss_ready_kb / 1024,
                  f"server VmRSS at its ready line with {board}; 1 run", 1)
        async with aiohttp.ClientSession(headers=server.headers) as http:
            await _answer_some(server.ws_url, http, server)
        sheet.put("rss_peak_answer_mb_1gb", server.hwm_kb() / 1024,
                  f"server VmHWM with {board} after 3 answers of one conversation and 4 "
                  "questions at once; 1 run", 1)
    finally:
        server.stop()
