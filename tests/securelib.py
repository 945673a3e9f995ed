"""Helpers of the security tests: tokens made by hand (also the malicious kinds PyJWT refuses
to make), raw sockets, and reading the audit log."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any


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


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def body_of(response: bytes) -> dict[str, Any]:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])
