"""HTTP API for knowledge bases and their documents (the web page and scripts use it).

Uploads stream to disk under a size cap into temporary files in <data_dir>/docs/<kb>/ (fsynced);
each is ingested on the ingest thread and takes the place of the stored file only once it
ingested, so a broken re-upload harms nothing; a failed part of a multi-part upload leaves no
file behind. The response is NDJSON, one line per file as it finishes, so a long ingest reports
progress while it runs. Errors: see errors_http.py (one body everywhere).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from . import events, keys
from .access import AUDIT_DETAILS, requires
from .errors import DocumentTooLarge, EdgekbError, NotFound, Unavailable
from .ingest import FileResult, Ingestor, IngestReport
from .ingest_service import IngestService
from .notices import broadcast
from .store import Store, check_kb_name

UPLOAD_BLOCK = 256 * 1024
# A file name we keep as it is: letters (any script), digits, space and . _ - ( ); no NUL,
# no path separator, no leading dot (hidden files are skipped by folder sync).
_SAFE_NAME = re.compile(r"[\w][\w .\-()]{0,200}")


class BadUpload(EdgekbError):
    code = "bad_upload"


def setup_api(app: web.Application) -> None:
    app.router.add_get("/api/kbs", list_kbs)
    app.router.add_get("/api/kbs/{kb}/documents", list_documents)
    app.router.add_post("/api/kbs/{kb}/documents", upload_documents)
    app.router.add_delete("/api/kbs/{kb}/documents/{doc_id:\\d{1,30}}", delete_document)
    app.router.add_post("/api/kbs/{kb}/reindex", reindex)


def _ingest_service(request: web.Request) -> IngestService:
    service = request.app.get(keys.INGEST)
    if service is None:
        raise Unavailable("documents cannot be changed on this server (no embedder loaded)")
    return service


async def list_kbs(request: web.Request) -> web.Response:
    def summary(store: Store) -> list[dict[str, Any]]:
        return [{"name": kb, "documents": len(docs), "chunks": sum(d.chunk_count for d in docs)}
                for kb in store.kbs() for docs in [store.documents(kb)]]
    return web.json_response({"kbs": await request.app[keys.STORE].read(summary)})


async def list_documents(request: web.Request) -> web.Response:
    kb = check_kb_name(request.match_info["kb"])
    docs = await request.app[keys.STORE].read(lambda s: s.documents(kb))
    if not docs:
        raise NotFound(f"no knowledge base {kb!r}")
    return web.json_response({"kb": kb, "documents": [
        {"id": d.id, "name": Path(d.path).name, "path": d.path, "title": d.title,
         "chunks": d.chunk_count, "sha256": d.sha256, "status": "indexed"} for d in docs]})


@requires("admin", audit="upload")
async def upload_documents(request: web.Request) -> web.StreamResponse:
    kb = check_kb_name(request.match_info["kb"])
    settings = request.app[keys.SETTINGS]
    service = _ingest_service(request)
    if not request.content_type.startswith("multipart/"):
        raise BadUpload("send the files as multipart/form-data")
    # The whole request is capped, not only each file: 1000 parts of max_file_mb would fill
    # the card. Refused before a byte is read when it says its length, else while reading.
    request[AUDIT_DETAILS] = {"kb": kb}
    request_cap = settings.limits.upload_request_mb * 2**20
    if (request.content_length or 0) > request_cap:
        raise DocumentTooLarge(f"the upload request is over limits.upload_request_mb "
                               f"({settings.limits.upload_request_mb} MB for all its files)")
    folder = settings.docs_dir / kb
    received: list[tuple[Path, Path]] = []
    try:
        async for pair in _receive_files(request, folder, settings.ingest.max_file_mb * 2**20,
                                         request_cap):
            received.append(pair)
    except BaseException:
        await _in_thread(_unlink_all, [tmp for tmp, _ in received])
        raise
    if not received:
        raise BadUpload("no file in the upload")
    request[AUDIT_DETAILS] = {"kb": kb, "files": [target.name for _, target in received]}

    def job(ingestor: Ingestor, emit: Callable[[FileResult], None]) -> IngestReport:
        report = IngestReport()
        try:
            for tmp, target in received:
                result = ingestor.ingest_upload(tmp, target, kb)
                report.results.append(result)
                emit(result)
            if any(r.status in ("added", "updated") for r in report.results):
                ingestor.save_index(kb)
        finally:
            _unlink_all([tmp for tmp, _ in received])  # those not ingested (a crash, a cancel)
        return report

    return await _stream_ingest(request, service, kb, job)


@requires("admin", audit="reindex")
async def reindex(request: web.Request) -> web.StreamResponse:
    kb = check_kb_name(request.match_info["kb"])
    docs = await request.app[keys.STORE].read(lambda s: s.documents(kb))
    if not docs:
        raise NotFound(f"no knowledge base {kb!r}")
    service = _ingest_service(request)
    paths = [Path(d.path) for d in docs]
    return await _stream_ingest(
        request, service, kb, lambda ing, emit: ing.ingest(paths, kb, on_file=emit, force=True))


@requires("admin", audit="delete_document")
async def delete_document(request: web.Request) -> web.Response:
    kb = check_kb_name(request.match_info["kb"])
    doc_id = int(request.match_info["doc_id"])
    request[AUDIT_DETAILS] = {"kb": kb, "document": doc_id}
    doc = await request.app[keys.STORE].read(lambda s: s.document_by_id(doc_id))
    if doc is None or doc.kb != kb:
        raise NotFound(f"no document {doc_id} in knowledge base {kb!r}")
    service = _ingest_service(request)

    def remove(ingestor: Ingestor) -> FileResult:
        result = ingestor.remove(kb, doc.path)
        ingestor.save_index(kb)
        return result

    result = await service.run(remove)
    settings = request.app[keys.SETTINGS]
    kept = Path(doc.path)
    if kept.parent == settings.docs_dir / kb:  # an uploaded copy is ours to delete
        await _in_thread(kept.unlink, True)
    await _announce_update(request, kb)
    return web.json_response({"deleted": doc_id, "chunks": result.chunks})


async def _receive_files(request: web.Request, folder: Path, cap: int,
                         request_cap: int) -> AsyncIterator[tuple[Path, Path]]:
    """Each file part to a temporary file in ``folder``, durably: (temporary, final path).
    A file over ``cap`` or a request over ``request_cap`` bytes -> too_large; a malformed
    body -> bad_upload."""
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, KeyError, HttpProcessingError) as exc:  # the parser
        raise BadUpload(f"malformed multipart body: {exc}") from None
    await _in_thread(folder.mkdir, 0o755, True, True)
    for _ in range(1000):  # parts per request, bounded
        try:
            part = await reader.next()
        except (ValueError, AssertionError, KeyError, UnicodeDecodeError,
                HttpProcessingError) as exc:
            raise BadUpload(f"malformed multipart body: {exc}") from None
        if part is None:
            return
        filename = getattr(part, "filename", None)
        if not filename:
            continue
        name = Path(filename.replace("\\", "/")).name
        if not _SAFE_NAME.fullmatch(name):
            raise BadUpload(f"file name {filename!r} is not allowed (letters, digits, space and"
                            " . _ - ( ), not starting with a dot)")
        tmp = folder / f".{name}.{secrets.token_hex(4)}.upload"
        yield tmp, folder / name
        await _write_part(part, tmp, cap, name, lambda: request.content.total_bytes
                          > request_cap)
    raise BadUpload("too many parts in one upload")


async def _write_part(part: Any, tmp: Path, cap: int, name: str,
                      request_over: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    # Disk writes (an SD card can stall for long) go to a thread, never the event loop.
    out = await loop.run_in_executor(None, tmp.open, "wb")
    try:
        size = 0
        while chunk := await part.read_chunk(UPLOAD_BLOCK):
            size += len(chunk)
            if size > cap:
                raise DocumentTooLarge(f"{name}: over the upload limit of {cap} bytes")
            if request_over():
                raise DocumentTooLarge("the upload request is over limits.upload_request_mb "
                                       "(all its files together)")
            await loop.run_in_executor(None, out.write, chunk)
        await loop.run_in_executor(None, _flush_and_sync, out)
    finally:
        out.close()


def _flush_and_sync(out: Any) -> None:
    out.flush()
    os.fsync(out.fileno())


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def _stream_ingest(request: web.Request, service: IngestService, kb: str,
                         job: Callable[[Ingestor, Callable[[FileResult], None]], IngestReport]
                         ) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def emit(result: FileResult) -> None:
        loop.call_soon_threadsafe(lines.put_nowait, {"type": "file", **asdict(result)})

    def run(ingestor: Ingestor) -> None:
        try:
            report = job(ingestor, emit)
            loop.call_soon_threadsafe(lines.put_nowait, {
                "type": "summary", **{s: report.count(s) for s in
                                      ("added", "updated", "unchanged", "removed", "failed")}})
        except EdgekbError as exc:
            loop.call_soon_threadsafe(lines.put_nowait, {"type": "error", **exc.to_wire()})
        finally:
            loop.call_soon_threadsafe(lines.put_nowait, None)

    task = asyncio.ensure_future(service.run(run))
    # Unbounded but finite: one line per file of this request, plus the summary.
    while (line := await lines.get()) is not None:
        await response.write(json.dumps(line).encode() + b"\n")
    await task
    await _announce_update(request, kb)
    await response.write_eof()
    return response


async def _announce_update(request: web.Request, kb: str) -> None:
    await broadcast(request.app, events.notice("kb_updated", f"knowledge base {kb!r} was updated",
                                               kb=kb))
