"""Which LLM a board gets when ``models.llm`` is ``auto``: chosen from the memory it has.

On a 1 GB board the 0.5B model (about 610 MB resident) beside the embedder, the server and the
OS leaves too little; the small model there, the bigger one from ``models.small_board_mb`` up
(README, Models, has the figures). An explicit model name always wins.
"""

from __future__ import annotations

from pathlib import Path

from .config import Settings

AUTO = "auto"
MEMINFO = Path("/proc/meminfo")


def memory_mb(meminfo: Path = MEMINFO) -> int | None:
    """MemTotal in MiB, or None where /proc/meminfo is not readable."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def llm_for_memory(settings: Settings, total_mb: int | None) -> str:
    models = settings.models
    if total_mb is not None and total_mb < models.small_board_mb:
        return models.llm_small_board
    return models.llm_large_board


def llm_name(settings: Settings, meminfo: Path = MEMINFO) -> str:
    """The manifest entry of the LLM to load on this machine."""
    if settings.models.llm != AUTO:
        return settings.models.llm
    return llm_for_memory(settings, memory_mb(meminfo))
