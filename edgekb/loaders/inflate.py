"""Decompression with a ceiling that counts real bytes: zip members and PDF streams.

Archives declare sizes, and bombs lie about them: Python's zipfile inflates a member's whole
compressed data in one call before it truncates to the declared size, so a 2 MiB DOCX can take
2 GiB of RAM. Here each member is inflated in bounded steps, the bytes it really produces are
counted against a per-part and a per-document ceiling, and it is refused the moment either is
passed, or when what it produces differs from what it declared (size or CRC). Memory stays at a
few MiB whatever the archive says. PDF streams get the same ceilings through pypdf's own limits
(per stream, as a second line) and a bounded count of each page's Flate streams before pypdf
decodes them, against both ceilings.

The ceilings come from settings (ingest.part_inflated_mb, ingest.document_inflated_mb); the
ingestor passes them to load_document, which makes them current for the loaders below it.
"""

from __future__ import annotations

import contextlib
import struct
import zipfile
import zlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptDocument, DocumentTooLarge

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_MAGIC = b"PK\x03\x04"
INPUT_STEP = 64 * 1024        # compressed bytes fed per step
OUTPUT_STEP = 1024 * 1024     # most inflated bytes held at once


@dataclass(frozen=True)
class InflateLimits:
    part_bytes: int = 64 * 1024 * 1024        # one zip member or PDF stream
    document_bytes: int = 256 * 1024 * 1024   # every member or stream of one document


DEFAULT_LIMITS = InflateLimits()
_CURRENT: ContextVar[InflateLimits] = ContextVar("inflate_limits", default=DEFAULT_LIMITS)


def current_limits() -> InflateLimits:
    return _CURRENT.get()


@contextlib.contextmanager
def applied(limits: InflateLimits | None) -> Iterator[InflateLimits]:
    """Make ``limits`` current for the loaders called inside (None: keep the current ones)."""
    if limits is None:
        yield _CURRENT.get()
        return
    token = _CURRENT.set(limits)
    try:
        yield limits
    finally:
        _CURRENT.reset(token)


class InflateBudget:
    """Counts the bytes one document inflates to, across its parts."""

    def __init__(self, path: Path, limits: InflateLimits) -> None:
        self.path = path
        self.limits = limits
        self.used = 0

    def add(self, part: str, size: int) -> None:
        if size > self.limits.part_bytes:
            raise DocumentTooLarge(f"{self.path.name}: {part} inflates to more than "
                                   f"{self.limits.part_bytes // 2**20} MB (a decompression bomb?)")
        self.used += size
        if self.used > self.limits.document_bytes:
            raise DocumentTooLarge(f"{self.path.name}: inflates to more than "
                                   f"{self.limits.document_bytes // 2**20} MB in all")


def count_inflated(raw: bytes, cap: int) -> int:
    """Bytes a zlib stream (PDF FlateDecode) inflates to, counted in bounded steps and stopped
    past ``cap`` (the count returned is then cap + 1). A damaged stream counts what inflated
    before the damage; its reader's own limits deal with the rest."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # zlib or gzip header
    size = 0
    try:
        for offset in range(0, len(raw), INPUT_STEP):
            pending = raw[offset:offset + INPUT_STEP]
            while pending:
                size += len(inflater.decompress(pending, OUTPUT_STEP))
                pending = inflater.unconsumed_tail
                if size > cap:
                    return cap + 1
                if inflater.eof:
                    return size
    except zlib.error:
        pass
    return size


def verify_zip_members(path: Path, data: bytes, members: list[zipfile.ZipInfo],
                       budget: InflateBudget) -> None:
    """Inflate every member in bounded steps (discarding the output), counting real bytes;
    afterwards every member is known to produce exactly its declared size and CRC, so a later
    reader (python-docx) that trusts those declarations is safe."""
    view = memoryview(data)
    for member in members:
        start = _data_offset(path, view, member)
        raw = view[start:start + member.compress_size]
        if len(raw) != member.compress_size:
            raise CorruptDocument(f"{path.name}: {member.filename} is cut short")
        size, crc = _inflate_counting(path, member, raw, budget)
        if size != member.file_size or crc != member.CRC:
            raise CorruptDocument(f"{path.name}: {member.filename} does not match the size "
                                  "and checksum the archive declares")


def _data_offset(path: Path, view: memoryview, member: zipfile.ZipInfo) -> int:
    header = bytes(view[member.header_offset:member.header_offset + _LOCAL_HEADER.size])
    if len(header) != _LOCAL_HEADER.size:
        raise CorruptDocument(f"{path.name}: {member.filename} points outside the archive")
    fields = _LOCAL_HEADER.unpack(header)
    if fields[0] != _LOCAL_MAGIC:
        raise CorruptDocument(f"{path.name}: {member.filename} has no local header")
    return member.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]


def _inflate_counting(path: Path, member: zipfile.ZipInfo, raw: memoryview,
                      budget: InflateBudget) -> tuple[int, int]:
    """(bytes produced, CRC-32) of one member, refused as soon as it passes its declared size
    or a ceiling."""
    part_left = budget.limits.part_bytes
    size, crc = 0, 0
    if member.compress_type == zipfile.ZIP_STORED:
        budget.add(member.filename, len(raw))
        return len(raw), zlib.crc32(raw)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    for offset in range(0, len(raw), INPUT_STEP):
        pending = bytes(raw[offset:offset + INPUT_STEP])
        while pending:
            try:
                out = inflater.decompress(pending, OUTPUT_STEP)
            except zlib.error as exc:
                raise CorruptDocument(f"{path.name}: {member.filename} is damaged ({exc})") \
                    from None
            pending = inflater.unconsumed_tail
            size += len(out)
            if size > member.file_size:
                raise DocumentTooLarge(f"{path.name}: {member.filename} inflates past the "
                                       f"{member.file_size} bytes it declares (a zip bomb?)")
            if size > part_left:
                budget.add(member.filename, size)  # raises: over the part ceiling
            crc = zlib.crc32(out, crc)
            if inflater.eof:
                break
        if inflater.eof:
            break
    budget.add(member.filename, size)
    return size, crc
