"""Ranking rules a technician notices, through `edgekb ingest` and `edgekb search` with the real
embedder: an option asked in its case finds its own entry, and a question that names the
product finds that product's manual when the manual's title does not name it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import edgekb_env, run_edgekb

from edgekb.retrieval import fts_query
from edgekb.store import Store

SMARTCTL = """# smartctl - Control and Monitor Utility for SMART Disks

## Options

### -h, --help, --usage

Prints a usage message to STDOUT and exits. smartctl shows every option it accepts.

### -H, --health

Prints the health status of the device: smartctl asks the disk whether it expects to fail
soon. The result is PASSED or FAILED.

### -i, --info

Prints the device model number, serial number and firmware version.
"""

# A manual whose title does not name the product; its file name does.
POSTGRESQL = """# 20.3. Connections and Authentication

## listen_addresses (string)

Specifies the TCP/IP address(es) on which the server is to listen for connections from client
applications. The value * corresponds to all available IP interfaces.
"""

MOSQUITTO = """# mosquitto.conf - the configuration file for mosquitto

## bind_interface device

Listen only on the given network interface, for example eth0, so that the broker does not
listen on every network interface of the machine.
"""


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, models_cache: Path) -> list[str]:
    root = tmp_path_factory.mktemp("ranking")
    folder = root / "manuals"
    folder.mkdir()
    (folder / "smartctl.md").write_text(SMARTCTL)
    (folder / "postgresql-runtime-config-connection.md").write_text(POSTGRESQL)
    (folder / "mosquitto.conf.md").write_text(MOSQUITTO)
    data = ["--data-dir", str(root / "data")]
    run_edgekb(["ingest", str(folder), "--kb", "plant", *data], edgekb_env(models_cache),
               check=True)
    return data


def search(library: list[str], models_cache: Path, question: str) -> list[dict[str, Any]]:
    found = run_edgekb(["search", question, "--kb", "plant", "--json", *library],
                       edgekb_env(models_cache), check=True)
    return [json.loads(line) for line in found.stdout.splitlines()]


def test_an_option_is_matched_in_its_own_case(library: list[str], models_cache: Path) -> None:
    hits = search(library, models_cache, "What does smartctl -H show?")
    assert "-H, --health" in hits[0]["where"], hits[0]


def test_the_manual_named_in_the_question_comes_first(library: list[str],
                                                      models_cache: Path) -> None:
    hits = search(library, models_cache, "How do I make PostgreSQL listen on all interfaces?")
    assert hits[0]["doc"] == "postgresql-runtime-config-connection.md", hits[0]


def test_a_vector_candidate_gets_the_same_bm25_as_a_keyword_match(library: list[str]) -> None:
    # Hybrid search scores vector candidates outside the keyword top list by BM25 too: the
    # figures must be those the keyword list gives, and a chunk without the words gets none.
    store = Store(Path(library[1]) / "edgekb.db")
    try:
        matches = dict(store.keyword_search("plant", fts_query(["listen", "interface"]), 10))
        assert len(matches) == 2
        ids = [*matches, max(matches) + 1000]
        assert store.keyword_scores(fts_query(["listen", "interface"]), ids) == matches
    finally:
        store.close()
