"""A real `edgekb serve` process on a loopback port, and a WebSocket client that times answers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import serverproc

from .common import HOST, edgekb_env, proc_status_kb

PROTOCOL = "edgekb.v2"
# An answer takes seconds on a quiet machine; other LLM processes on 2 cores slow it 20-fold.
ANSWER_TIMEOUT_S = 900

@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    startup_s: float
    rss_ready_kb: int
    token: str = ""
    _drain: threading.Thread | None = field(default=None, repr=False)

    @property
    def headers(self) -> dict[str, str]:
        """For every client of this server: authentication is on, as shipped."""
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int:
        return int(self.url.rstrip("/").rsplit(":", 1)[1])

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "ws"

    def rss_kb(self) -> int:
        return proc_status_kb(self.pid, "VmRSS")

    def hwm_kb(self) -> int:
        return proc_status_kb(self.pid, "VmHWM")

    def stop(self) -> None:
        serverproc.stop(self.process)
        if self._drain is not None:
            self._drain.join(timeout=5)


def start_server(data_dir: Path, log_path: Path, *settings: str, timeout: float = 180) -> Server:
    """Start `edgekb serve --port 0` with ``--set`` settings; wait for its ready line.

    stderr is read by a thread (and copied to ``log_path``) so the ready line is timed exactly
    and the server never blocks on a full pipe. It inherits the open-file limit this process
    raised at start (__main__), enough for thousands of sockets.
    """
    token = serverproc.issue_token(data_dir, edgekb_env())
    args = [sys.executable, "-m", "edgekb", "serve", "--data-dir", str(data_dir),
            "--host", HOST, "--port", "0"]
    for item in (*serverproc.UNLIMITED, *settings):
        args += ["--set", item]
    started = time.perf_counter()
    process = subprocess.Popen(args, env=edgekb_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    ready = threading.Event()
    found: dict[str, Any] = {}

    def drain() -> None:
        assert process.stderr is not None
        with log_path.open("wb") as out:
            for line in process.stderr:  # ends when the server exits
                out.write(line)
                out.flush()
                if not ready.is_set():
                    match = serverproc.READY.search(line.decode(errors="replace"))
                    if match:
                        found["at"] = time.perf_counter()
                        found["url"] = f"http://{match[1]}:{match[2]}/"
                        found["rss"] = proc_status_kb(process.pid, "VmRSS")
                        ready.set()
        ready.set()

    thread = threading.Thread(target=drain, name="server-stderr", daemon=True)
    thread.start()
    if not ready.wait(timeout) or "url" not in found:
        process.kill()
        process.wait(timeout=10)
        raise RuntimeError(f"server not ready (exit {process.poll()}):\n"
                           f"{log_path.read_text(errors='replace')[-3000:]}")
    return Server(process, found["url"], log_path, found["at"] - started, found["rss"], token,
                  thread)


def ingest_demo(data_dir: Path, timeout: float = 600) -> None:
    """`edgekb ingest --demo` into a new data dir."""
    result = subprocess.run([sys.executable, "-m", "edgekb", "ingest", "--demo", "--data-dir",
                             str(data_dir)], env=edgekb_env(), text=True, capture_output=True,
                            timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"edgekb ingest --demo failed:\n{result.stderr[-3000:]}")


async def connect(http: aiohttp.ClientSession, url: str, session_id: str | None = None,
                  compress: int = 0) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    """Open /ws (optionally continuing a session); returns the socket and its welcome."""
    target = f"{url}?session={session_id}" if session_id else url
    ws = await http.ws_connect(target, protocols=(PROTOCOL,), compress=compress,
                               autoping=True, max_msg_size=0)
    welcome = await receive(ws, 60)
    if welcome.get("type") != "welcome":
        raise RuntimeError(f"expected welcome, got {welcome}")
    return ws, welcome


async def until_idle(http: aiohttp.ClientSession, server: Server, timeout: float = 120) -> None:
    """Wait until the server's LLM has nothing to do, idle-time pre-reading included (it would
    share the cores with whatever is measured next)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with http.get(server.url + "api/status") as response:
            status = await response.json()
        if status["llm"] == "idle" and status["heads_waiting"] == 0:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the server's LLM was still busy after {timeout:.0f} s: {status}")


async def receive(ws: aiohttp.ClientWebSocketResponse, timeout: float) -> dict[str, Any]:
    msg = await ws.receive(timeout=timeout)
    if msg.type != aiohttp.WSMsgType.TEXT:
        raise RuntimeError(f"connection ended: {msg.type} {msg.data!r}")
    return json.loads(msg.data)


@dataclass
class Answer:
    """One request as a client saw it; times are time.perf_counter() seconds."""

    sent_at: float
    events: list[dict[str, Any]] = field(default_factory=list)
    first_queued_at: float | None = None
    first_delta_at: float | None = None
    last_delta_at: float | None = None
    done_at: float | None = None

    @property
    def done(self) -> dict[str, Any]:
        last = self.events[-1] if self.events else {}
        if last.get("type") != "done":
            raise RuntimeError(f"request ended without done: {last}")
        return last

    @property
    def text(self) -> str:
        """The answer as the client has it: its deltas joined (done carries only a digest)."""
        return "".join(e["text"] for e in self.events if e["type"] == "delta")

    @property
    def ttft_ms(self) -> float:
        assert self.first_delta_at is not None
        return (self.first_delta_at - self.sent_at) * 1000

    def client_tokens_per_s(self) -> float | None:
        """(completion tokens - 1) over the time from the first to the last delta."""
        tokens = self.done["usage"].get("completion_tokens", 0)
        if tokens < 2 or self.first_delta_at is None or self.last_delta_at is None:
            return None
        span = self.last_delta_at - self.first_delta_at
        return (tokens - 1) / span if span > 0 else None


async def send_ask(ws: aiohttp.ClientWebSocketResponse, request_id: str, text: str) -> Answer:
    answer = Answer(time.perf_counter())
    await ws.send_str(json.dumps({"type": "ask", "id": request_id, "text": text}))
    return answer


async def follow(ws: aiohttp.ClientWebSocketResponse, request_id: str, answer: Answer,
                 timeout: float = ANSWER_TIMEOUT_S, until: str = "done") -> Answer:
    """Read events of ``request_id`` into ``answer`` until done/error (or the first ``until``
    event, e.g. "queued"); bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            message = await receive(ws, left)
        except asyncio.TimeoutError:
            raise RuntimeError(f"no {until} event for request {request_id} within {timeout} s "
                               "(is the machine busy with other work?)") from None
        if message.get("id") != request_id:
            continue
        now = time.perf_counter()
        answer.events.append(message)
        kind = message["type"]
        if kind == "queued" and answer.first_queued_at is None:
            answer.first_queued_at = now
        elif kind == "delta":
            if answer.first_delta_at is None:
                answer.first_delta_at = now
            answer.last_delta_at = now
        elif kind in ("done", "error"):
            answer.done_at = now
            return answer
        if kind == until:
            return answer


async def ask(ws: aiohttp.ClientWebSocketResponse, request_id: str, text: str,
              timeout: float = ANSWER_TIMEOUT_S) -> Answer:
    return await follow(ws, request_id, await send_ask(ws, request_id, text), timeout)
