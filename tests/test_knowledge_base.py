"""Knowledge bases over HTTP and the CLI: upload, list, delete, reindex, folder sync, scoping."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import Server, collect, edgekb_env, receive_json, run_edgekb, start_server

VALVE_DOC = """# Gate valve GV-40

## Packing adjustment

If the stem leaks, tighten the gland nuts a quarter turn each, alternately, with the valve
open. Stop as soon as the leak stops; over-tightening makes the handwheel stiff.

## Parameters

| Parameter | Value |
|---|---|
| `gv40.stroke.turns` | 11 |
| Gland nut torque | 18 Nm |
"""


@pytest.fixture(scope="module")
def kb_server(tmp_path_factory: pytest.TempPathFactory, models_cache: Path) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("kb") / "data"
    env = edgekb_env(models_cache)
    run_edgekb(["ingest", "--demo", "--data-dir", str(data_dir)], env, check=True)
    srv = start_server(data_dir, env, "--set", "ingest.max_file_mb=1",
                       "--set", "generation.max_tokens=16")
    yield srv
    srv.stop()


async def upload(server: Server, kb: str, files: dict[str, bytes]) -> tuple[int, list[Any]]:
    form = aiohttp.FormData()
    for name, data in files.items():
        form.add_field("file", io.BytesIO(data), filename=name,
                       content_type="application/octet-stream")
    async with aiohttp.ClientSession(headers=server.headers) as http, \
            http.post(f"{server.url}api/kbs/{kb}/documents", data=form) as response:
        body = await response.text()
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        return response.status, lines


async def get_json(server: Server, path: str) -> Any:
    async with aiohttp.ClientSession(headers=server.headers) as http, \
            http.get(server.url + path) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def ask_sources(server: Server, text: str, kbs: list[str] | None) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession(headers=server.headers) as http:
        ws = await http.ws_connect(server.ws_url, protocols=("edgekb.v2",))
        await receive_json(ws)
        message: dict[str, Any] = {"type": "ask", "id": "s", "text": text}
        if kbs is not None:
            message["kbs"] = kbs
        await ws.send_json(message)
        events = await collect(ws, "s")
        await ws.close()
    return [e for e in events if e["type"] == "source"]


async def test_upload_reports_each_file_and_bad_files_harm_nothing(kb_server: Server) -> None:
    async with aiohttp.ClientSession(headers=kb_server.headers) as http:
        watcher = await http.ws_connect(kb_server.ws_url, protocols=("edgekb.v2",))
        await receive_json(watcher)
        status, lines = await upload(kb_server, "line-1", {
            "gv40.md": VALVE_DOC.encode(),
            "broken.pdf": b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\ngarbage",
            "photo.txt": bytes(range(256)) * 8,
        })
        notice = await receive_json(watcher, timeout=30)
        await watcher.close()
    assert status == 200
    by_name = {Path(line["path"]).name: line for line in lines if line["type"] == "file"}
    assert by_name["gv40.md"]["status"] == "added" and by_name["gv40.md"]["chunks"] > 0
    assert by_name["broken.pdf"]["status"] == "failed"
    assert by_name["broken.pdf"]["code"] == "corrupt_document"
    assert by_name["photo.txt"]["status"] == "failed" and "binary" in by_name["photo.txt"]["error"]
    assert lines[-1] == {"type": "summary", "added": 1, "updated": 0, "unchanged": 0,
                         "removed": 0, "failed": 2}
    assert notice["type"] == "notice" and notice["event"] == "kb_updated"

    docs = (await get_json(kb_server, "api/kbs/line-1/documents"))["documents"]
    assert [d["name"] for d in docs] == ["gv40.md"] and docs[0]["chunks"] > 0
    kbs = {kb["name"]: kb for kb in (await get_json(kb_server, "api/kbs"))["kbs"]}
    assert set(kbs) == {"default", "line-1"} and kbs["line-1"]["documents"] == 1


async def test_question_searches_only_the_named_knowledge_bases(kb_server: Server) -> None:
    await upload(kb_server, "line-1", {"gv40.md": VALVE_DOC.encode()})
    scoped = await ask_sources(kb_server, "How do I stop a leaking valve stem?", ["line-1"])
    assert scoped and {s["doc"] for s in scoped} == {"gv40.md"}
    other = await ask_sources(kb_server, "How do I stop a leaking valve stem?", ["default"])
    assert "gv40.md" not in {s["doc"] for s in other}
    everything = await ask_sources(kb_server, "gv40.stroke.turns", None)
    assert everything[0]["doc"] == "gv40.md"


async def test_too_large_upload_is_refused_and_nothing_kept(kb_server: Server) -> None:
    status, lines = await upload(kb_server, "big", {"huge.txt": b"word " * 300_000})
    assert status == 413 and lines[0]["error"]["code"] == "too_large"
    assert not (kb_server.data_dir / "docs" / "big").exists() or \
        not any((kb_server.data_dir / "docs" / "big").iterdir())
    assert "big" not in {kb["name"] for kb in (await get_json(kb_server, "api/kbs"))["kbs"]}


async def test_bad_names_get_typed_errors(kb_server: Server) -> None:
    async with aiohttp.ClientSession(headers=kb_server.headers) as http:
        async with http.get(f"{kb_server.url}api/kbs/Bad Name!/documents") as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "invalid_kb"
        async with http.delete(f"{kb_server.url}api/kbs/line-1/documents/999999") as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "not_found"


async def test_deleted_document_never_comes_back(kb_server: Server) -> None:
    await upload(kb_server, "line-2", {"gv40.md": VALVE_DOC.encode()})
    docs = (await get_json(kb_server, "api/kbs/line-2/documents"))["documents"]
    async with aiohttp.ClientSession(headers=kb_server.headers) as http, \
            http.delete(f"{kb_server.url}api/kbs/line-2/documents/{docs[0]['id']}") as response:
        assert response.status == 200
    async with aiohttp.ClientSession(headers=kb_server.headers) as http, \
            http.get(f"{kb_server.url}api/kbs/line-2/documents") as response:
        assert response.status == 404  # its only document gone, the knowledge base is too
        assert (await response.json())["error"]["code"] == "not_found"
    sources = await ask_sources(kb_server, "gland nut torque gv40.stroke.turns", ["line-2"])
    assert sources == []


async def test_reindex_reingests_every_document(kb_server: Server) -> None:
    await upload(kb_server, "line-3", {"gv40.md": VALVE_DOC.encode()})
    async with aiohttp.ClientSession(headers=kb_server.headers) as http, \
            http.post(f"{kb_server.url}api/kbs/line-3/reindex") as response:
        lines = [json.loads(x) for x in (await response.text()).splitlines()]
    assert [line["status"] for line in lines if line["type"] == "file"] == ["updated"]


def test_folder_sync_adds_updates_and_removes(tmp_path: Path, models_cache: Path) -> None:
    env = edgekb_env(models_cache)
    folder = tmp_path / "manuals"
    folder.mkdir()
    (folder / "valve.md").write_text(VALVE_DOC)
    (folder / "pump.txt").write_text("Pump P-9\n\nPrime the pump before the first start.\n")
    data = ["--data-dir", str(tmp_path / "data")]
    run_edgekb(["ingest", str(folder), "--kb", "plant", *data], env, check=True)
    (folder / "pump.txt").unlink()
    second = run_edgekb(["ingest", str(folder), "--kb", "plant", *data], env, check=True)
    assert "1 unchanged, 1 removed" in second.stderr
    found = run_edgekb(["search", "prime the pump", "--kb", "plant", "--json", *data], env,
                       check=True)
    hits = [json.loads(line) for line in found.stdout.splitlines()]
    assert hits and all(h["doc"] == "valve.md" and h["kb"] == "plant" for h in hits)
    keyword = run_edgekb(["search", "gv40.stroke.turns", "--mode", "keyword", "--kb", "plant",
                          *data], env, check=True)
    assert keyword.stdout.startswith("[1] ") and "valve.md" in keyword.stdout.splitlines()[0]


async def test_a_broken_reupload_keeps_the_good_version(kb_server: Server) -> None:
    status, lines = await upload(kb_server, "line-4", {"manual.md": VALVE_DOC.encode()})
    assert status == 200 and lines[0]["status"] == "added"
    stored = kb_server.data_dir / "docs" / "line-4" / "manual.md"
    assert stored.read_bytes() == VALVE_DOC.encode()
    status, lines = await upload(kb_server, "line-4", {"manual.md": bytes(range(256)) * 40})
    assert lines[0]["status"] == "failed"
    assert stored.read_bytes() == VALVE_DOC.encode(), "a failed re-upload replaced the good file"
    assert [p.name for p in stored.parent.iterdir()] == ["manual.md"], "an orphan was left"
    sources = await ask_sources(kb_server, "gland nut torque", ["line-4"])
    assert sources and sources[0]["doc"] == "manual.md"
    async with aiohttp.ClientSession(headers=kb_server.headers) as http, \
            http.post(f"{kb_server.url}api/kbs/line-4/reindex") as response:
        lines = [json.loads(x) for x in (await response.text()).splitlines()]
    assert [line["status"] for line in lines if line["type"] == "file"] == ["updated"]


async def test_a_failed_part_of_an_upload_leaves_nothing(kb_server: Server) -> None:
    status, lines = await upload(kb_server, "line-5", {"ok.md": VALVE_DOC.encode(),
                                                       "huge.txt": b"word " * 300_000})
    assert status == 413 and lines[0]["error"]["code"] == "too_large"
    folder = kb_server.data_dir / "docs" / "line-5"
    assert not folder.exists() or not any(folder.iterdir()), list(folder.iterdir())


async def test_hostile_uploads_get_typed_errors(kb_server: Server) -> None:
    url = f"{kb_server.url}api/kbs/line-6/documents"
    async with aiohttp.ClientSession(headers=kb_server.headers) as http:
        for name in (b"bad\x00name.md", b".hidden.md", b"long" * 60 + b".md"):
            # Built by hand: aiohttp's client refuses to send a NUL in a header, curl does not.
            body = (b"--XX\r\nContent-Disposition: form-data; name=file; filename=\"" + name +
                    b"\"\r\n\r\n# x\n\ny\n\r\n--XX--\r\n")
            async with http.post(url, data=body, headers={
                    "Content-Type": "multipart/form-data; boundary=XX"}) as response:
                reply = await response.json()
                assert response.status == 400 and reply["error"]["code"] == "bad_upload", reply
        broken = b"--XX\r\nContent-Disposition: form-data; name=file; filename=a.md\r\n" \
            b"\r\nhalf a part and no closing boundary"
        async with http.post(url, data=broken, headers={
                "Content-Type": "multipart/form-data; boundary=XX"}) as response:
            body = await response.json()
            assert response.status == 400 and body["error"]["code"] == "bad_upload", body
        async with http.post(url, data=b"{}", headers={
                "Content-Type": "application/json"}) as response:
            assert (await response.json())["error"]["code"] == "bad_upload"
    folder = kb_server.data_dir / "docs" / "line-6"
    assert not folder.exists() or not any(folder.iterdir()), list(folder.iterdir())


async def test_errors_of_the_http_parser_have_the_json_body(kb_server: Server) -> None:
    host, port = kb_server.url.split("//")[1].rstrip("/").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /api/kbs HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n")
        await writer.drain()
        response = await asyncio.wait_for(reader.read(4096), 10)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400", head
    assert json.loads(body)["error"]["code"] == "bad_request", body


def test_a_folder_below_a_hidden_directory_is_ingested_and_synced_safely(
        tmp_path: Path, models_cache: Path) -> None:
    env = edgekb_env(models_cache)
    folder = tmp_path / ".local" / "share" / "manuals"
    (folder / ".drafts").mkdir(parents=True)
    (folder / "valve.md").write_text(VALVE_DOC)
    (folder / "pump.txt").write_text("Pump P-9\n\nPrime the pump before the first start.\n")
    (folder / ".drafts" / "draft.md").write_text("# Draft\n\nNot for the shop floor.\n")
    link = tmp_path / "manuals-link"
    link.symlink_to(folder)
    data = ["--data-dir", str(tmp_path / "data")]
    first = run_edgekb(["ingest", str(link), "--kb", "plant", *data], env, check=True)
    assert "2 added" in first.stderr and "draft.md" not in first.stderr, first.stderr
    # A hidden file named on its own is ingested; a later folder sync must not remove it
    # just because the folder filter does not see it.
    run_edgekb(["ingest", str(folder / ".drafts" / "draft.md"), "--kb", "plant", *data], env,
               check=True)
    (folder / "pump.txt").unlink()
    second = run_edgekb(["ingest", str(folder), "--kb", "plant", *data], env, check=True)
    assert "1 unchanged, 1 removed" in second.stderr, second.stderr
    listed = run_edgekb(["search", "shop floor draft", "--kb", "plant", "--json", *data], env,
                        check=True)
    assert any(json.loads(line)["doc"] == "draft.md" for line in listed.stdout.splitlines())


def test_a_batch_that_finds_no_document_fails_and_says_so(tmp_path: Path,
                                                          models_cache: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.odt").write_bytes(b"not a supported format")
    result = run_edgekb(["ingest", str(empty), "--data-dir", str(tmp_path / "data")],
                        edgekb_env(models_cache))
    assert result.returncode != 0 and "no_documents" in result.stderr, result.stderr
    assert "0 added" not in result.stderr
