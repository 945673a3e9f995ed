"""What a board gets by default, by the memory it has: the LLM with `models.llm: auto`, and a
1 GB board's generation settings; a setting the user names always wins."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import DEFAULT_LLM, SMALL_BOARD_LLM, edgekb_env, run_edgekb

from edgekb.boards import SMALL_BOARD_PROFILE, llm_for_memory, llm_name, memory_mb
from edgekb.config import ModelsSettings, Settings, load_settings

ONE_GB_BOARD = "MemTotal:         927716 kB\nMemFree:  1000 kB\n"   # a Raspberry Pi 3
FOUR_GB_BOARD = "MemTotal:        3887104 kB\n"


def test_one_gigabyte_board_gets_the_small_model_and_a_bigger_one_the_default() -> None:
    settings = Settings()
    assert llm_for_memory(settings, 906) == SMALL_BOARD_LLM      # a Pi 3 / 1 GB board
    assert llm_for_memory(settings, 3796) == DEFAULT_LLM         # a 4 GB board
    assert llm_for_memory(settings, None) == DEFAULT_LLM         # unknown: not a tiny board


def test_explicit_name_wins_and_meminfo_is_read(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(ONE_GB_BOARD)
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


def test_a_one_gigabyte_board_decodes_fewer_answers_at_once_unless_told_otherwise(
        tmp_path: Path) -> None:
    """Four slots' KV caches and the large state cache would take a 1 GB board past its memory
    budget (MemoryHigh in the unit): it starts from the 1 GB profile's generation settings."""
    small, large = tmp_path / "small", tmp_path / "large"
    small.write_text(ONE_GB_BOARD)
    large.write_text(FOUR_GB_BOARD)
    profile = yaml.safe_load(SMALL_BOARD_PROFILE.read_text())["generation"]
    on_small = load_settings(env={}, meminfo=small).generation
    on_large = load_settings(env={}, meminfo=large).generation
    assert (on_small.slots, on_small.state_cache_mb) == (profile["slots"],
                                                         profile["state_cache_mb"])
    assert on_small.slots < on_large.slots == Settings().generation.slots
    assert on_small.state_cache_mb < on_large.state_cache_mb
    # The user's own file, environment and command line still win, and auto still picks the
    # small-board LLM the user configured.
    config = tmp_path / "edgekb.yaml"
    config.write_text("generation:\n  state_cache_mb: 48\n"
                      "models:\n  llm_small_board: gemma3-270m\n")
    told = load_settings(config, env={"EDGEKB_GENERATION__SLOTS": "3"}, meminfo=small)
    assert (told.generation.slots, told.generation.state_cache_mb) == (3, 48)
    assert llm_name(told, small) == "gemma3-270m"
    assert load_settings(env={}, overrides={"generation.slots": 1}, meminfo=small
                         ).generation.slots == 1


def test_config_show_prints_a_small_boards_settings(models_cache: Path) -> None:
    env = edgekb_env(models_cache)
    here = yaml.safe_load(run_edgekb(["config", "show", "--set", "models.small_board_mb=0"], env,
                                     check=True).stdout)
    small = yaml.safe_load(run_edgekb(["config", "show", "--set",
                                       "models.small_board_mb=10000000"], env,
                                      check=True).stdout)
    assert here["generation"]["slots"] == Settings().generation.slots
    assert small["generation"]["slots"] < here["generation"]["slots"]
