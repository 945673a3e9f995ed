"""Give freed heap memory back to the system after a burst of allocations.

glibc keeps what Python, onnxruntime and llama.cpp free in its malloc arenas, so RSS stays at
the high-water mark of the last busy spell (an ingest, several answers and their KV snapshots):
malloc_trim(0) returns it (51 MB after a round of answers, benchlib.memory). It walks the heap
for a few milliseconds, so it runs when work ends (the LLM goes idle, an ingest job finishes),
never per token. A no-op where the C library has no malloc_trim (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util

_name = ctypes.util.find_library("c")
_trim = getattr(ctypes.CDLL(_name), "malloc_trim", None) if _name else None


def trim() -> None:
    if _trim is not None:
        _trim(0)
