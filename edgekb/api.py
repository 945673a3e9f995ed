"""HTTP API for knowledge bases and their documents (the web page and scripts use it).

Uploads stream to disk under a size cap, are kept in <data_dir>/docs/<kb>/ (written to a
temporary name, fsynced, renamed), then ingested on the ingest thread; the response is NDJSON,
one line per file as it finishes, so a long ingest reports progress while it runs.
Every error has one body: {"error": {"code", "message"}}.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aiohttp import web

from . import keys
from .errors import DocumentTooLarge, EdgekbError
from .ingest import FileResult, Ingestor
from .notices import broadcast
from .store import Store, check_kb_name

UPLOAD_BLOCK = 256 * 1024
_SAFE_NAME = re.compile(r"^[\w][\w .\-()]{0,200}$")


class NotFound(EdgekbError):
    code = "not_found"


class BadUpload(EdgekbError):
    code = "bad_upload"


STATUS_BY_CODE = {"not_found": 404, "too_large": 413, "invalid_kb": 400, "bad_upload": 400}


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except EdgekbError as exc:
        return web.json_response({"error": exc.to_wire()},
                                 status=STATUS_BY_CODE.get(exc.code, 400))


def setup_api(app: web.Application) -> None:
    app.router.add_get("/api/kbs", list_kbs)
    app.router.add_get("/api/kbs/{kb}/documents", list_documents)
    app.router.add_post("/api/kbs/{kb}/documents", upload_documents)
    app.router.add_delete("/api/kbs/{kb}/documents/{doc_id:\\d+}", delete_document)
    app.router.add_post("/api/kbs/{kb}/reindex", reindex)


async def list_kbs(request: web.Request) -> web.Response:
    def summary(store: Store) -> list[dict[str, Any]]:
        return [{"name": kb, "documents": len(docs), "chunks": sum(d.chunk_count for d in docs)}
                for kb in store.kbs() for docs in [store.documents(kb)]]
    return web.json_response({"kbs": await request.app[keys.STORE].read(summary)})


async def list_documents(request: web.Request) -> web.Response:
    kb = check_kb_name(request.match_info["kb"])
    docs = await request.app[keys.STORE].read(lambda s: s.documents(kb))
    return web.json_response({"kb": kb, "documents": [
        {"id": d.id, "name": Path(d.path).name, "path": d.path, "title": d.title,
         "chunks": d.chunk_count, "sha256": d.sha256, "status": "indexed"} for d in docs]})


async def upload_documents(request: web.Request) -> web.StreamResponse:
    kb = check_kb_name(request.match_info["kb"])
    settings = request.app[keys.SETTINGS]
    cap = settings.ingest.max_file_mb * 1024 * 1024
    folder = settings.docs_dir / kb
    if not request.content_type.startswith("multipart/"):
        raise BadUpload("send the files as multipart/form-data")
    saved = [path async for path in _receive_files(await request.multipart(), folder, cap)]
    if not saved:
        raise BadUpload("no file in the upload")
    return await _stream_ingest(request, kb,
                                lambda ing, emit: ing.ingest(saved, kb, on_file=emit))


async def reindex(request: web.Request) -> web.StreamResponse:
    kb = check_kb_name(request.match_info["kb"])
    docs = await request.app[keys.STORE].read(lambda s: s.documents(kb))
    paths = [Path(d.path) for d in docs]
    return await _stream_ingest(
        request, kb, lambda ing, emit: ing.ingest(paths, kb, on_file=emit, force=True))


async def delete_document(request: web.Request) -> web.Response:
    kb = check_kb_name(request.match_info["kb"])
    doc_id = int(request.match_info["doc_id"])
    doc = await request.app[keys.STORE].read(lambda s: s.document_by_id(doc_id))
    if doc is None or doc.kb != kb:
        raise NotFound(f"no document {doc_id} in knowledge base {kb!r}")

    def remove(ingestor: Ingestor) -> FileResult:
        result = ingestor.remove(kb, doc.path)
        ingestor.library.get(kb).save(ingestor.store)
        return result

    result = await request.app[keys.INGEST].run(remove)
    settings = request.app[keys.SETTINGS]
    kept = Path(doc.path)
    if kept.parent == settings.docs_dir / kb:  # an uploaded copy is ours to delete
        kept.unlink(missing_ok=True)
    await _announce_update(request, kb)
    return web.json_response({"deleted": doc_id, "chunks": result.chunks})


async def _receive_files(reader: Any, folder: Path, cap: int) -> Any:
    """Each file part to <folder>/<name>, durably; over the cap -> too_large, nothing kept."""
    while (part := await reader.next()) is not None:
        if not part.filename:
            continue
        name = Path(part.filename).name
        if not _SAFE_NAME.match(name):
            raise BadUpload(f"file name {part.filename!r} is not allowed")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, folder.mkdir, 0o755, True, True)
        target = folder / name
        tmp = folder / f".{name}.upload"
        size = 0
        # Disk writes (an SD card can stall for long) go to a thread, never the event loop.
        out = await loop.run_in_executor(None, tmp.open, "wb")
        try:
            while chunk := await part.read_chunk(UPLOAD_BLOCK):
                size += len(chunk)
                if size > cap:
                    raise DocumentTooLarge(f"{name}: over the upload limit of {cap} bytes")
                await loop.run_in_executor(None, out.write, chunk)
            await loop.run_in_executor(None, _flush_and_sync, out)
        except BaseException:
            out.close()
            tmp.unlink(missing_ok=True)
            raise
        out.close()
        await loop.run_in_executor(None, os.replace, tmp, target)
        yield target


def _flush_and_sync(out: Any) -> None:
    out.flush()
    os.fsync(out.fileno())


async def _stream_ingest(request: web.Request, kb: str,
                         job: Callable[[Ingestor, Callable[[FileResult], None]], Any]
                         ) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def emit(result: FileResult) -> None:
        loop.call_soon_threadsafe(lines.put_nowait, {"type": "file", **asdict(result)})

    def run(ingestor: Ingestor) -> Any:
        try:
            report = job(ingestor, emit)
            loop.call_soon_threadsafe(lines.put_nowait, {
                "type": "summary", **{s: report.count(s) for s in
                                      ("added", "updated", "unchanged", "removed", "failed")}})
        finally:
            loop.call_soon_threadsafe(lines.put_nowait, None)

    task = asyncio.ensure_future(request.app[keys.INGEST].run(run))
    # Unbounded but finite: one line per file of this request, plus the summary.
    while (line := await lines.get()) is not None:
        await response.write(json.dumps(line).encode() + b"\n")
    await task
    await _announce_update(request, kb)
    await response.write_eof()
    return response


async def _announce_update(request: web.Request, kb: str) -> None:
    await broadcast(request.app, {"type": "notice", "event": "kb_updated", "kb": kb,
                                  "message": f"knowledge base {kb!r} was updated"})
