"""Shared fixtures: the real default models, a data dir with the demo manuals, a real server.

The server is the real `edgekb serve` process on a free loopback port, started once per test
module that uses it. Models come from the cache that scripts/test fills (TEST_MODEL_CACHE), or
are fetched here once.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgekb import events as wire
from edgekb.catalog import Catalog, default_manifest_path, fetch

REPO = Path(__file__).resolve().parent.parent
# What `models.llm: auto` picks on a machine with 1.5 GB or more (CI has 24 GB), the small-board
# LLM (tests of the 1 GB choice start it), and the embedder.
DEFAULT_LLM = "qwen25-coder-05b"
SMALL_BOARD_LLM = "smollm2-135m"
DEFAULT_MODELS = (DEFAULT_LLM, SMALL_BOARD_LLM, "minilm-l6-int8")
READY = re.compile(r"edgekb ready on (https?)://([\d.]+):(\d+)/")
DEMO_QUESTION = "How do I reset the pump after an overpressure trip?"


@pytest.fixture(scope="session")
def models_cache() -> Path:
    cache = Path(os.environ.get("TEST_MODEL_CACHE", REPO / ".cache" / "models"))
    catalog = Catalog.load(default_manifest_path())
    for name in DEFAULT_MODELS:
        fetch(cache, catalog.get(name))  # a no-op when already verified
    return cache


def edgekb_env(models_cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKB_")}
    env["EDGEKB_MODELS__CACHE_DIR"] = str(models_cache)
    env.update(extra)
    return env


def run_edgekb(args: list[str], env: dict[str, str], timeout: float = 300,
               check: bool = False) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "edgekb", *args], env=env, text=True,
                            capture_output=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"edgekb {' '.join(args)} failed:\n{result.stderr}")
    return result


def issue_token(data_dir: Path, env: dict[str, str], role: str = "admin",
                sub: str = "test-admin", ttl: str = "8h") -> str:
    """A token from `edgekb token issue` against the data dir, as an operator makes one."""
    return run_edgekb(["token", "issue", "--sub", sub, "--role", role, "--ttl", ttl,
                       "--data-dir", str(data_dir)], env, check=True).stdout.strip()


@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str
    data_dir: Path
    log: Path
    token: str = ""  # an admin token of this data dir: tests talk to a server with auth on

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://").replace("https://", "wss://") + "ws"

    @property
    def headers(self) -> dict[str, str]:
        """For aiohttp.ClientSession(headers=...): every request and upgrade carries them."""
        return {"Authorization": f"Bearer {self.token}"}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_server(data_dir: Path, env: dict[str, str], *extra_args: str,
                 timeout: float = 120, launcher: tuple[str, ...] = ()) -> Server:
    """Start `edgekb serve --port 0` and wait for its ready line (bounded in time).
    ``launcher`` runs it through a command such as ("prlimit", "--nofile=1024:1024")."""
    token = issue_token(data_dir, env)
    log = data_dir.parent / f"{data_dir.name}-serve.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [*launcher, sys.executable, "-m", "edgekb", "serve", "--data-dir", str(data_dir),
             "--host", "127.0.0.1", "--port", "0", *extra_args],
            env=env, text=True, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = READY.search(log.read_text())
        if match:
            return Server(process, f"{match[1]}://{match[2]}:{match[3]}/", data_dir, log, token)
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text()}")
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"server not ready in {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def demo_data_dir(tmp_path_factory: pytest.TempPathFactory, models_cache: Path) -> Path:
    data_dir = tmp_path_factory.mktemp("demo") / "data"
    run_edgekb(["ingest", "--demo", "--data-dir", str(data_dir)], edgekb_env(models_cache),
               check=True)
    return data_dir


@pytest.fixture(scope="module")
def server(demo_data_dir: Path, models_cache: Path) -> Iterator[Server]:
    srv = start_server(demo_data_dir, edgekb_env(models_cache))
    yield srv
    srv.stop()


# Events of other requests seen while collecting one, kept for their own collect() call.
_SET_ASIDE: weakref.WeakKeyDictionary[aiohttp.ClientWebSocketResponse, list[dict[str, Any]]] = \
    weakref.WeakKeyDictionary()


async def collect(ws: aiohttp.ClientWebSocketResponse, request_id: str,
                  timeout: float = 300) -> list[dict[str, Any]]:
    """Events of one request until its done or error (bounded by a deadline). Events of other
    requests on the same socket are set aside for their own collect(), never dropped."""
    return await until(ws, request_id, "done", timeout)


async def until(ws: aiohttp.ClientWebSocketResponse, request_id: str, event_type: str,
                timeout: float = 180) -> list[dict[str, Any]]:
    """Events of one request up to its first ``event_type`` (a delta, say), or its done or
    error; other requests' events are set aside for their own call: with several slots, a
    request asked second can be done before the first one writes its first token."""
    stops = (event_type, "done", "error")
    aside = _SET_ASIDE.setdefault(ws, [])
    mine = [e for e in aside if e.get("id") == request_id]
    end = next((n + 1 for n, e in enumerate(mine) if e["type"] in stops), None)
    events = mine[:end]
    # What comes after the stop stays set aside, first in line, for the next call.
    aside[:] = mine[len(events):] + [e for e in aside if e.get("id") != request_id]
    if end is not None:
        return events
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # asyncio.wait_for: aiohttp's own receive timeout restarts at every server ping.
        msg = await asyncio.wait_for(ws.receive(), max(0.1, deadline - time.monotonic()))
        assert msg.type == aiohttp.WSMsgType.TEXT, f"connection ended: {msg}"
        assert not wire.problems(msg.data), (wire.problems(msg.data), msg.data)
        message = json.loads(msg.data)
        if message.get("id") != request_id:
            if "id" in message:
                aside.append(message)
            continue
        events.append(message)
        if message["type"] in stops:
            return events
    raise AssertionError(f"no {event_type} for {request_id} within {timeout} s: {events}")


def answer_text(events: list[dict[str, Any]]) -> str:
    """The answer as the client assembles it from the deltas, checked against `done`."""
    text = "".join(e["text"] for e in events if e["type"] == "delta")
    if events and events[-1]["type"] == "done":
        assert events[-1]["chars"] == len(text), "deltas do not add up to the answer"
        assert events[-1]["sha256"] == wire.text_digest(text)
    return text


def sources_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "source"]


async def receive_json(ws: aiohttp.ClientWebSocketResponse, timeout: float = 30) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, f"connection ended: {msg}"
    return json.loads(msg.data)
