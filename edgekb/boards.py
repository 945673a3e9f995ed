"""What a board gets by default, chosen from the memory it has: the LLM when ``models.llm`` is
``auto``, and the generation settings.

On a 1 GB board the 0.5B model (about 610 MB resident) beside the embedder, the server and the
OS leaves too little; the small model there, the bigger one from ``models.small_board_mb`` up
(README, Models, has the figures). Four slots' KV caches and the default state cache would
still take SmolLM2 past a 1 GB board's budget, so such a board starts from the generation
settings of profiles/board-1gb.yaml. An explicit setting always wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # config builds its defaults from this module
    from .config import Settings

AUTO = "auto"
MEMINFO = Path("/proc/meminfo")
SMALL_BOARD_PROFILE = Path(__file__).with_name("profiles") / "board-1gb.yaml"


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


def small_board_defaults(small_board_mb: int, meminfo: Path = MEMINFO
                         ) -> tuple[str, dict[str, Any]] | None:
    """(where from, settings tree) of the defaults a board below ``small_board_mb`` starts
    from, or None on a bigger board (or where the memory is unknown). Only the profile's
    generation settings: its ``models.llm`` is for ``--config`` on any machine, while here
    ``models.llm: auto`` already picks ``models.llm_small_board``, which a user may change."""
    total_mb = memory_mb(meminfo)
    if total_mb is None or total_mb >= small_board_mb:
        return None
    profile = yaml.safe_load(SMALL_BOARD_PROFILE.read_text(encoding="utf-8"))
    return (f"{SMALL_BOARD_PROFILE} (the defaults of a board with {total_mb} MiB)",
            {"generation": profile["generation"]})
