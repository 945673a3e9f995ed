"""Helpers of the security tests: tokens made by hand (also the malicious kinds PyJWT refuses
to make), raw sockets, and reading the audit log."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import struct
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

from edgekb.evaluation import pdf_file


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """A JWT signed with HMAC-SHA256 over ``secret``, or unsigned when ``secret`` is None
    (``alg: none``), whatever the header claims."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    if secret is None:
        return signing_input + "."
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def claims(sub: str = "mallory", role: str = "admin", ttl: float = 3600, **extra: Any) -> dict:
    now = int(time.time())
    base = {"iss": "edgekb", "aud": "edgekb", "sub": sub, "role": role, "iat": now,
            "exp": now + int(ttl), "jti": f"forged-{now}"}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def audit_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def wait_for_audit(path: Path, match: dict[str, Any], timeout: float = 10.0,
                         count: int = 1) -> list[dict[str, Any]]:
    """Audit lines that contain every key/value of ``match``, once ``count`` of them exist."""
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in audit_lines(path)
                 if all(line.get(k) == v for k, v in match.items())]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.1)


async def raw_request(host: str, port: int, request: bytes, timeout: float = 10.0,
                      local_addr: str | None = None) -> bytes:
    """Send bytes on a fresh TCP connection and read until the server closes it."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        host, port, local_addr=(local_addr, 0) if local_addr else None), timeout)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def one_response(host: str, port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send one request and read one response (headers and a Content-Length body), whether
    or not the server keeps the connection open."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        return head + await asyncio.wait_for(reader.readexactly(length), timeout)
    finally:
        writer.close()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def body_of(response: bytes) -> dict[str, Any]:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


# --- decompression bombs ---------------------------------------------------------------------

_UNIT = 1 << 20


def deflate_padded(prefix: bytes, pad: bytes, pad_mib: int, suffix: bytes) -> bytes:
    """A raw deflate stream of prefix + pad * (pad_mib MiB) + suffix, made in milliseconds:
    after a full flush the compressor starts afresh, so every padding MiB compresses to the
    same bytes and is written by repetition."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    unit = c.compress(pad * (_UNIT // len(pad))) + c.flush(zlib.Z_FULL_FLUSH)
    tail = c.compress(suffix) + c.flush()
    return head + unit * pad_mib + tail


def zip_bytes(members: list[tuple[str, int, bytes, int, int]]) -> bytes:
    """A zip written by hand, so it can lie: (name, method, data, crc, declared size)."""
    out, central = bytearray(), bytearray()
    for name, method, data, crc, size in members:
        offset, encoded = len(out), name.encode()
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc,
                           len(data), size, len(encoded), 0) + encoded + data
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, method, 0,
                               0x21, crc, len(data), size, len(encoded), 0, 0, 0, 0, 0,
                               offset) + encoded
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(members), len(members),
                      len(central), len(out), 0)
    return bytes(out + central + end)


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def docx_bomb(real_docx: bytes, inflated_mib: int = 2048, declared: int = 100_000) -> bytes:
    """A real DOCX whose word/document.xml inflates to ``inflated_mib`` MiB of valid XML
    (whitespace between paragraphs) while the archive declares ``declared`` bytes."""
    with zipfile.ZipFile(io.BytesIO(real_docx)) as source:
        parts = {info.filename: source.read(info) for info in source.infolist()}
    document = parts.pop("word/document.xml")
    cut = document.index(b"<w:body>") + len(b"<w:body>")
    members = [(name, 8, _deflate(data), zlib.crc32(data), len(data))
               for name, data in parts.items()]
    bomb = deflate_padded(document[:cut], b" ", inflated_mib, document[cut:])
    members.append(("word/document.xml", 8, bomb, zlib.crc32(document), declared))
    return zip_bytes(members)


def pdf_bomb(inflated_mib: int = 2048) -> bytes:
    """A one-page PDF whose content stream (FlateDecode) inflates to ``inflated_mib`` MiB."""
    content = zlib.compressobj(9, zlib.DEFLATED, 15)  # zlib format, as PDF wants
    ops = b"BT /F1 12 Tf 72 720 Td (Boom) Tj ET\n"
    head = content.compress(ops) + content.flush(zlib.Z_FULL_FLUSH)
    unit = content.compress(b" " * _UNIT) + content.flush(zlib.Z_FULL_FLUSH)
    stream = head + unit * inflated_mib + content.flush()
    font = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [4 0 R] /Count 1 >>",
               font, b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources "
               b"<< /Font << /F1 3 0 R >> >> /Contents 5 0 R >>",
               b"<< /Length %d /Filter /FlateDecode >>\nstream\n%s\nendstream"
               % (len(stream), stream)]
    return pdf_file(objects)
