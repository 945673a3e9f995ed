"""Where the server's memory goes: RSS after each component is loaded, in a process of its own.

Run as `python -m benchlib.memory DATA_DIR [KEY=VALUE ...]` (settings as `--set` takes them). It
loads what `edgekb serve` loads, in the server's order, with edgekb's own functions, and prints
one JSON object: VmRSS (MiB) after each step and the growth each step caused, the resident part
of the GGUF file's mapping, and the KV snapshots the state cache held after a few sessions.
Steps: interpreter, imports (aiohttp, numpy, onnxruntime, llama_cpp, hnswlib), SQLite and the
vector index, the onnxruntime session, its arena after a query and after an ingest-sized batch,
the LLM's weights, its context (KV cache, compute buffers), a first answer, then answers of
several sessions (the state cache fills toward its budget), and malloc_trim at the end.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

_STEPS: list[tuple[str, float]] = []


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def mapping_rss_mb(suffix: str) -> float:
    """Resident MiB of the file mappings whose path ends with ``suffix``."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
                inside = len(head) >= 6 and head[-1].endswith(suffix)
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total / 1024


def step(name: str) -> None:
    _STEPS.append((name, rss_mb()))


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def main() -> None:
    step("interpreter")
    import aiohttp  # noqa: F401
    import yaml  # noqa: F401

    step("aiohttp")
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401
    import tokenizers  # noqa: F401

    step("numpy_onnxruntime_libraries")
    import llama_cpp  # noqa: F401

    step("llama_cpp_library")
    import hnswlib  # noqa: F401

    from edgekb import app  # noqa: F401  (everything else the server imports)
    from edgekb.config import load_settings
    from edgekb.engines import load_embedder, load_llm, open_catalog, open_library, prompt_builder
    from edgekb.llm import GenerationRequest, LlmEngine
    from edgekb.store import Store

    step("edgekb_modules")
    data_dir = Path(sys.argv[1])
    overrides: dict[str, Any] = {"data_dir": data_dir}
    for item in sys.argv[2:]:
        key, _, value = item.partition("=")
        overrides[key] = value
    settings = load_settings(None, overrides=overrides)
    catalog = open_catalog(settings)
    embedder = load_embedder(settings, catalog)
    step("onnxruntime_session")
    embedder.embed("How do I reset the pump after an overpressure trip?")
    step("onnxruntime_first_query")
    embedder.embed_batch(["torque the flange bolts in a cross pattern " * 24] * 2)
    step("onnxruntime_ingest_batch")
    store = Store(settings.db_path)
    library = open_library(settings, embedder)
    library.load(store)
    step("sqlite_and_index")
    llm, entry = load_llm(settings, catalog)
    assert isinstance(llm, LlmEngine)
    gguf = entry.files[0].name if entry.files else ".gguf"
    step("llm_weights_and_context")
    builder = prompt_builder(settings, llm, entry)
    demo = Path(__file__).resolve().parents[2] / "edgekb" / "demo"
    manuals = sorted(demo.iterdir())

    async def answer(number: int, session: str) -> None:
        text = manuals[number % len(manuals)].read_text()[:2400]
        from edgekb.store import ChunkHit

        hit = ChunkHit(number, "default", str(manuals[number % len(manuals)]), "manual", "",
                       None, text)
        prompt = builder.build(f"What does section {number} say about safety?", [hit])
        request = GenerationRequest(prompt.text, settings.generation.max_tokens, 0.0,
                                    prompt.stop, threading.Event(), session)
        async for _ in llm.stream(request):
            pass

    weights_before = mapping_rss_mb(gguf)
    asyncio.run(answer(0, "s0"))
    step("first_answer")
    weights_after = mapping_rss_mb(gguf)
    started = time.perf_counter()
    asyncio.run(_several(answer, settings.generation.slots + 4))
    step("answers_of_several_sessions")
    cache_bytes = llm.states.size
    malloc_trim()
    step("after_malloc_trim")
    print(json.dumps({
        "rss_mb": {name: round(mb, 1) for name, mb in _STEPS},
        "growth_mb": {name: round(mb - _STEPS[i - 1][1], 1) if i else round(mb, 1)
                      for i, (name, mb) in enumerate(_STEPS)},
        "gguf_resident_mb": {"after_load": round(weights_before, 1),
                             "after_answers": round(weights_after, 1)},
        "state_cache_mb": round(cache_bytes / 2**20, 1),
        "state_cache_budget_mb": settings.generation.state_cache_mb,
        "several_answers_s": round(time.perf_counter() - started, 1),
    }))
    llm.close()
    store.close()


async def _several(answer, count: int) -> None:  # type: ignore[no-untyped-def]
    await asyncio.gather(*(answer(n + 1, f"s{n + 1}") for n in range(count)))


if __name__ == "__main__":
    main()
