"""Error types of edgekb, each with the code it carries on the wire.

Every error a user or a client can see is an ``EdgekbError``: it has a stable ``code`` (used in
WebSocket ``error`` events, HTTP bodies and CLI messages) and a human message. ``to_wire`` is the
one place the error body is shaped.
"""

from __future__ import annotations

from typing import Any


class EdgekbError(Exception):
    """Base of every typed error; ``code`` names it on the wire."""

    code = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        body.update(self.details)
        return body


class ConfigError(EdgekbError):
    """The settings are invalid; ``problems`` lists every problem found, one line each."""

    code = "config_invalid"

    def __init__(self, problems: list[str], source: str = "") -> None:
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the configuration{where}:\n{lines}")
        self.problems = problems


class ModelError(EdgekbError):
    """A model entry or file cannot be used."""

    code = "model_error"


class ModelMissing(ModelError):
    """A model file is not in the cache; the message names the fetch command."""

    code = "model_missing"


class ChecksumMismatch(ModelError):
    """A model file's sha256 differs from the manifest: it is never loaded."""

    code = "checksum_mismatch"


class SourceUnavailable(ModelError):
    """No source of a model file could be reached or read."""

    code = "source_unavailable"


class IngestError(EdgekbError):
    """A document could not be ingested; the rest of the batch goes on."""

    code = "ingest_failed"


class UnsupportedFormat(IngestError):
    code = "unsupported_format"


class EmptyDocument(IngestError):
    code = "empty_document"


class DocumentTooLarge(IngestError):
    code = "too_large"


class ProtocolError(EdgekbError):
    """A client message broke the protocol; ``code`` says how (see protocol.py)."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message, **details)
        self.code = code


class Busy(EdgekbError):
    """The answer queue is full; the client should retry after ``retry_after`` seconds."""

    code = "busy"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after)


class EncryptedDocument(IngestError):
    """The document needs a password; edgekb never asks for one."""

    code = "encrypted_document"


class CorruptDocument(IngestError):
    """The file is damaged or is not the format its name says."""

    code = "corrupt_document"


class StorageError(EdgekbError):
    """A write to the data dir failed (a full or failing disk); nothing unsaved was sent."""

    code = "storage_error"


class DiskFull(EdgekbError):
    """Free space on the data dir's disk is under the configured floor: new work is refused
    before a write can fail half-way."""

    code = "disk_full"


class SchemaTooNew(EdgekbError):
    """The data dir was written by a newer edgekb; an older one must not touch it."""

    code = "schema_too_new"


class EmbedderMismatch(EdgekbError):
    """The stored vectors come from another embedder than the configured one."""

    code = "embedder_mismatch"


class NotFound(EdgekbError):
    code = "not_found"


class Unavailable(EdgekbError):
    """A part of the appliance this request needs is not loaded (or is shutting down)."""

    code = "unavailable"


class Interrupted(EdgekbError):
    """The server stopped while the answer was being written; the log keeps what was sent."""

    code = "interrupted"
