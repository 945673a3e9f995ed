"""The LLM a board gets with `models.llm: auto`: by the memory it has; a name always wins."""

from __future__ import annotations

from pathlib import Path

from conftest import DEFAULT_LLM, SMALL_BOARD_LLM, edgekb_env, run_edgekb
from edgekb.boards import llm_for_memory, llm_name, memory_mb
from edgekb.config import ModelsSettings, Settings


def test_one_gigabyte_board_gets_the_small_model_and_a_bigger_one_the_default() -> None:
    settings = Settings()
    assert llm_for_memory(settings, 906) == SMALL_BOARD_LLM      # a Pi 3 / 1 GB board
    assert llm_for_memory(settings, 3796) == DEFAULT_LLM         # a 4 GB board
    assert llm_for_memory(settings, None) == DEFAULT_LLM         # unknown: not a tiny board


def test_explicit_name_wins_and_meminfo_is_read(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:         927716 kB\nMemFree:  1000 kB\n")
    assert memory_mb(meminfo) == 905
    assert llm_name(Settings(), meminfo) == SMALL_BOARD_LLM
    explicit = Settings(models=ModelsSettings(llm="gemma3-270m"))
    assert llm_name(explicit, meminfo) == "gemma3-270m"
    assert memory_mb(tmp_path / "missing") is None


def test_models_list_marks_the_model_this_machine_gets(models_cache: Path) -> None:
    env = edgekb_env(models_cache)
    here = run_edgekb(["models", "list"], env, check=True).stdout
    small = run_edgekb(["models", "list", "--set", "models.small_board_mb=10000000"], env,
                       check=True).stdout
    assert f"* {DEFAULT_LLM}" in here and f"* {SMALL_BOARD_LLM}" not in here
    assert f"* {SMALL_BOARD_LLM}" in small and f"* {DEFAULT_LLM}" not in small
