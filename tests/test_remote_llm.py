"""The LLM step on another server: llama-cpp-python's own OpenAI-compatible server on loopback,
with the same events reaching the client as with the local engine."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from conftest import (
    DEMO_QUESTION,
    REPO,
    Server,
    answer_text,
    collect,
    edgekb_env,
    receive_json,
    start_server,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(models_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model",
             str(models_cache / "qwen25-coder-05b" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--seed", "0"],
            stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(endpoint + "/models", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        else:
            raise AssertionError(f"llama server not up:\n{log.read_text()}")
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def remote_server(llama_server: str, demo_data_dir: Path, models_cache: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    import shutil

    work = tmp_path_factory.mktemp("remote")
    manifest = work / "models.toml"
    manifest.write_text((REPO / "models.toml").read_text() + f"""
[models.remote-qwen]
kind = "llm"
endpoint = "{llama_server}"
model = "qwen"
n_ctx = 2048
prompt_format = "completion"
stop = ["\\nQuestion:", "\\n\\n\\n", "\\n\\n["]
""")
    data_dir = work / "data"
    shutil.copytree(demo_data_dir, data_dir, ignore=shutil.ignore_patterns("edgekb.lock"))
    srv = start_server(data_dir, edgekb_env(models_cache), "--set", f"models.manifest={manifest}",
                       "--set", "models.llm=remote-qwen", "--set", "generation.max_tokens=48")
    yield srv
    srv.stop()


async def test_answer_streams_from_a_remote_openai_compatible_server(
        remote_server: Server) -> None:
    async with aiohttp.ClientSession(headers=remote_server.headers) as http:
        ws = await http.ws_connect(remote_server.ws_url, protocols=("edgekb.v2",))
        await receive_json(ws)
        await ws.send_json({"type": "ask", "id": "r1", "text": DEMO_QUESTION})
        events = await collect(ws, "r1")
        await ws.close()
    kinds = [e["type"] for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "done", kinds
    assert kinds.index("source") < kinds.index("delta")
    sources = [e for e in events if e["type"] == "source"]
    assert sources[0]["doc"] == "pump-manual.md"
    text = "".join(e["text"] for e in events if e["type"] == "delta")
    assert text.strip() and text == answer_text(events)
    assert events[-1]["usage"]["completion_tokens"] > 0


async def test_unreachable_remote_server_is_a_typed_error(
        remote_server: Server, demo_data_dir: Path, models_cache: Path, tmp_path: Path) -> None:
    import shutil

    manifest = tmp_path / "models.toml"
    manifest.write_text((REPO / "models.toml").read_text() + f"""
[models.nowhere]
kind = "llm"
endpoint = "http://127.0.0.1:{free_port()}/v1"
n_ctx = 2048
""")
    # A question the manuals cover, so the answer really needs the LLM.
    shutil.copytree(demo_data_dir, tmp_path / "data", ignore=shutil.ignore_patterns("edgekb.lock"))
    srv = start_server(tmp_path / "data", edgekb_env(models_cache),
                       "--set", f"models.manifest={manifest}", "--set", "models.llm=nowhere")
    try:
        async with aiohttp.ClientSession(headers=srv.headers) as http:
            ws = await http.ws_connect(srv.ws_url, protocols=("edgekb.v2",))
            await receive_json(ws)
            await ws.send_json({"type": "ask", "id": "x", "text": DEMO_QUESTION})
            events = await collect(ws, "x")
            await ws.close()
        assert events[-1]["type"] == "error" and events[-1]["code"] == "llm_unavailable"
    finally:
        srv.stop()
