"""The command line as a newcomer meets it: `edgekb ask` against no server, a wrong URL, Ctrl-C
once and twice, a follow-up in the same conversation, an unknown knowledge base; `edgekb ingest`
progress on a terminal and in a log; --help with examples.

`edgekb ask` runs as a real subprocess against the app on a real loopback port (the scripted
engine answers: these tests are about the client); test_answer_stream.py asks the real models.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from faultproxy import FaultProxy
from scripted import ScriptedAnswers

from conftest import edgekb_env, run_edgekb
from edgekb.app import create_app
from edgekb.config import load_settings
from edgekb.tokens import token_authority


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    def __init__(self, server: TestServer, engine: ScriptedAnswers, data_dir: Path,
                 token: str) -> None:
        self.server, self.engine, self.data_dir = server, engine, data_dir
        self.token = token  # auth is on: the CLI passes it as $EDGEKB_TOKEN

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.server.port}/ws"


@pytest.fixture
async def app(aiohttp_server: Any, tmp_path: Path) -> AsyncIterator[App]:
    data_dir = tmp_path / "data"
    settings = load_settings(env={}, overrides={"data_dir": data_dir, "storage.min_free_mb": 0})
    engine = ScriptedAnswers()
    server = await aiohttp_server(create_app(settings, answers=engine))
    token, _ = token_authority(settings).issue("tech", "user", 3600)
    yield App(server, engine, data_dir, token)


async def edgekb(app: App, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run the CLI, with the app's token, without blocking the loop that serves it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgekb", *args, env=token_env(app),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def token_env(app: App) -> dict[str, str]:
    return edgekb_env(Path("/nonexistent"), EDGEKB_TOKEN=app.token)


async def started(engine: ScriptedAnswers, question: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while question not in engine.started:
        assert time.monotonic() < deadline, f"{question!r} never started: {engine.started}"
        await asyncio.sleep(0.05)


def test_help_has_examples() -> None:
    env = edgekb_env(Path("/nonexistent"))
    top = run_edgekb(["--help"], env, check=True).stdout
    assert "examples:" in top and "edgekb ingest --demo" in top
    ask = run_edgekb(["ask", "--help"], env, check=True).stdout
    assert "--session" in ask and "--kb" in ask and "--data-dir" in ask
    assert 'edgekb ask "How do I reset the pump after an overpressure trip?"' in ask
    assert "Ctrl-C" in ask


def test_an_http_url_is_refused_naming_the_websocket_one() -> None:
    result = run_edgekb(["ask", "q", "--url", "http://10.0.0.5:8080/"],
                        edgekb_env(Path("/nonexistent")))
    assert result.returncode == 2
    assert "ws://10.0.0.5:8080/ws" in result.stderr, result.stderr


def test_no_server_fails_within_seconds_saying_what_to_check(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "edgekb.yaml"
    config.write_text(f"server:\n  port: {port}\n")
    started_at = time.monotonic()
    result = run_edgekb(["ask", "q", "--config", str(config)], edgekb_env(Path("/nonexistent")),
                        timeout=60)
    took = time.monotonic() - started_at
    assert result.returncode == 1, result
    # The URL came from the settings; the message says what to check.
    assert f"ws://127.0.0.1:{port}/ws" in result.stderr, result.stderr
    assert "edgekb serve" in result.stderr and "--url" in result.stderr
    assert took < 20, f"took {took:.1f} s to give up on a refused connection"


async def test_a_follow_up_continues_the_session_and_kbs_are_checked(app: App) -> None:
    code, out, err = await edgekb(app, "ask", "first question", "--url", app.ws_url)
    assert code == 0, err
    assert out.startswith("[1] P-200 manual, Troubleshooting (pump-manual.md, high match)")
    assert "Close the discharge valve." in out
    session = err.split("-- session ", 1)[1].split()[0]
    # As the hint says: --session=ID (an id may start with "-").
    assert f"--session={session})" in err, err
    code, _, err = await edgekb(app, "ask", "second question", "--url", app.ws_url,
                                f"--session={session}")
    assert code == 0, err
    assert app.engine.histories["second question"] == ["first question"]
    assert f"-- session {session} " in err
    code, _, err = await edgekb(app, "ask", "third", "--url", app.ws_url, "--kb", "line-9")
    assert code == 1 and "error [not_found]" in err and "line-9" in err, err


async def test_ctrl_c_cancels_on_the_appliance_and_a_second_quits_at_once(app: App) -> None:
    app.engine.script("held", hold_after=1)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgekb", "ask", "held", "--url", app.ws_url,
        env=token_env(app), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    await started(app.engine, "held")
    process.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 130, err
    assert b"-- cancelled" in err and b"stopping the answer" in err, err
    assert out.decode().startswith("[1] ") and "Close" in out.decode()
    # The appliance stopped it: the one model slot is free, nobody waits for a grace time.
    with contextlib.closing(sqlite3.connect(app.data_dir / "edgekb.db")) as db:
        assert db.execute("SELECT state FROM requests").fetchall() == [("cancelled",)]


async def test_a_second_ctrl_c_quits_while_the_link_is_silent(app: App) -> None:
    app.engine.script("held", hold_after=1)
    proxy = await FaultProxy(app.server.port).start()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgekb", "ask", "held", "--url", proxy.ws_url(),
            env=token_env(app), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        await started(app.engine, "held")
        proxy.stall()  # the cancel cannot arrive, its answer cannot come back
        process.send_signal(signal.SIGINT)
        await asyncio.sleep(1)
        assert process.returncode is None, "quit at the first Ctrl-C"
        pressed = time.monotonic()
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), 10)
        assert process.returncode == 130
        assert time.monotonic() - pressed < 5
    finally:
        await proxy.close()


def test_ingest_shows_progress_per_file_and_chunk_on_a_terminal_and_lines_in_a_log(
        tmp_path: Path, models_cache: Path) -> None:
    env = edgekb_env(models_cache)
    demo = Path(__file__).resolve().parent.parent / "edgekb" / "demo"
    # A terminal: one line redrawn per file, then its result.
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "edgekb", "ingest", str(demo),
                                "--data-dir", str(tmp_path / "tty")], env=env,
                               stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    screen = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the process closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    assert process.wait(timeout=60) == 0, screen.decode(errors="replace")
    text = screen.decode()
    assert "[1/4] compressor-troubleshooting.md  reading…" in text, text
    assert "embedding" in text and "chunks" in text and "\r" in text
    assert "added  " in text and "pump-manual.md" in text
    # A log (not a terminal): plain lines, a file's chunk count before its result.
    plain = run_edgekb(["ingest", str(demo), "--data-dir", str(tmp_path / "log")], env,
                       check=True).stderr
    assert "\r" not in plain and "\x1b" not in plain
    lines = plain.splitlines()
    first = next(i for i, line in enumerate(lines) if re.fullmatch(
        r"\[1/4\] compressor-troubleshooting\.md: embedding \d+ chunks", line))
    assert re.match(r"\s*added  .*compressor-troubleshooting\.md  \(\d+ chunks\)",
                    lines[first + 1]), lines
    # An unknown knowledge base is not found, not an empty answer.
    search = run_edgekb(["search", "pump", "--kb", "line-9", "--data-dir", str(tmp_path / "log")],
                        env)
    assert search.returncode == 2 and "[not_found]" in search.stderr, search.stderr
