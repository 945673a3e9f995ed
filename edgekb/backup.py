"""Backup and restore of a data dir: one archive, consistent while the server runs.

A backup is a tar file (gzip when its name ends in .gz): a snapshot of the database taken with
SQLite's online backup API in one step (one read transaction: in WAL mode the server goes on
writing meanwhile, and the copy is exactly the database at one instant), the uploaded documents
and every other file of the data dir (a signing key, the audit log), and a manifest with the
sha256 of each part. Not in it: the vector index (rebuilt from the vectors in the database on
restore), the model cache (fetched again and verified) and earlier backups. The archive is
written under a temporary name, fsynced and renamed, so FILE is either complete or absent.

Restore goes into an empty data dir only, checks every part against the manifest before
anything is moved into place, migrates the schema forward and rebuilds the index.

Before a start-up migrates the schema of an existing database, ``before_migrating`` keeps a
backup in <data_dir>/backups/ (the newest PRE_UPGRADE_KEEP of them).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import sqlite3
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from . import __version__
from .config import Settings
from .errors import DiskFull, EdgekbError, SchemaTooNew
from .migrations import MIGRATIONS

log = logging.getLogger(__name__)

ROOT = "edgekb-backup"
MANIFEST = f"{ROOT}/manifest.json"
DATABASE = f"{ROOT}/edgekb.db"
FILES = f"{ROOT}/files/"
FORMAT = 1
DB_NAME = "edgekb.db"
PRE_UPGRADE_DIR = "backups"
PRE_UPGRADE_KEEP = 2
BLOCK = 1 << 20
# Never copied: SQLite's own files (the snapshot stands for them), the lock, the model cache,
# earlier backups; index files (rebuilt on restore); dot-files (uploads in progress, staging).
_SKIPPED_TOP = {DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", "edgekb.lock", "models",
                PRE_UPGRADE_DIR}
_SKIPPED_NAME = re.compile(r"^\.|^index-.*\.(bin|tmp)$")
# What an empty data dir may already hold: the model cache and the lock of a past process.
_ALLOWED_IN_EMPTY = {"models", "edgekb.lock"}
_STAGING = ".restore-staging"


class BackupError(EdgekbError):
    code = "backup_failed"


class RestoreError(EdgekbError):
    code = "restore_failed"


@dataclass(frozen=True)
class BackupReport:
    path: Path
    size: int
    files: int
    schema_version: int
    counts: dict[str, int]
    seconds: float


@dataclass(frozen=True)
class RestoreReport:
    data_dir: Path
    files: int
    schema_version: int
    counts: dict[str, int]
    indexes: dict[str, int]


def ensure_room(folder: Path, needed: int, min_free_mb: int, what: str) -> None:
    """Refuse work that would leave less than ``min_free_mb`` free on ``folder``'s disk."""
    free = shutil.disk_usage(folder).free
    floor = min_free_mb * 1024 * 1024
    if free - needed < floor:
        raise DiskFull(
            f"{what} needs {_mb(needed)} MB and {folder} has {_mb(free)} MB free; at least"
            f" {min_free_mb} MB must stay free (storage.min_free_mb): free some space first")


def schema_version(db_path: Path) -> int:
    conn = sqlite3.connect(f"{db_path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


# --- backup ----------------------------------------------------------------------------------

def create_backup(settings: Settings, target: Path, min_free_mb: int) -> BackupReport:
    started = time.monotonic()
    db_path = settings.db_path
    if not db_path.is_file():
        raise BackupError(f"{settings.data_dir} holds no database ({DB_NAME}): nothing to back"
                          " up; check --data-dir")
    target = target.absolute()
    if target.is_dir():
        raise BackupError(f"{target} is a folder; name the archive file, e.g. {target}/"
                          f"edgekb-{time.strftime('%Y%m%d-%H%M%S')}.tar.gz")
    target.parent.mkdir(parents=True, exist_ok=True)
    files = list(_data_files(settings.data_dir))
    db_bytes = sum(p.stat().st_size for p in db_path.parent.glob(f"{DB_NAME}*")
                   if p.name in _SKIPPED_TOP)
    # The snapshot and the archive exist side by side until the end.
    ensure_room(target.parent, 2 * db_bytes + sum(size for _, _, size in files), min_free_mb,
                "the backup")
    snapshot = target.with_name(f".{target.name}.{os.getpid()}.db")
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        version, counts = _snapshot(db_path, snapshot)
        entries = _write_archive(partial, snapshot, files, target.name.endswith(".gz"), {
            "format": FORMAT, "edgekb": __version__, "created_at": time.time(),
            "schema_version": version, "data_dir": str(settings.data_dir),
            "docs_dir": str(settings.docs_dir), "embedder": settings.models.embedder,
            "counts": counts})
        _fsync(partial)
        os.replace(partial, target)
        _fsync_dir(target.parent)
    finally:
        snapshot.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return BackupReport(target, target.stat().st_size, entries, version, counts,
                        time.monotonic() - started)


def _data_files(data_dir: Path) -> Iterator[tuple[Path, str, int]]:
    """(path, path relative to the data dir, size) of every file a backup keeps."""
    for top in sorted(data_dir.iterdir()):
        if top.name in _SKIPPED_TOP or _SKIPPED_NAME.match(top.name):
            continue
        paths = [top] if not top.is_dir() else sorted(
            p for p in top.rglob("*") if not any(_SKIPPED_NAME.match(part)
                                                 for part in p.relative_to(data_dir).parts))
        for path in paths:
            if path.is_file() and not path.is_symlink():
                yield path, path.relative_to(data_dir).as_posix(), path.stat().st_size


def _snapshot(db_path: Path, snapshot: Path) -> tuple[int, dict[str, int]]:
    """Copy the live database in one backup step (one consistent read transaction)."""
    source = sqlite3.connect(f"{db_path.absolute().as_uri()}?mode=ro", uri=True)
    copy = sqlite3.connect(snapshot)
    try:
        source.backup(copy)
        copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        check = copy.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise BackupError(f"the database fails SQLite's check ({check}); the last good"
                              " backup is the one to keep")
        version = copy.execute("PRAGMA user_version").fetchone()[0]
        counts = _counts(copy)
    finally:
        copy.close()
        source.close()
    _fsync(snapshot)
    return version, counts


def _counts(conn: sqlite3.Connection) -> dict[str, int]:
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
    return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("documents", "chunks", "sessions", "turns") if t in tables}


def _write_archive(partial: Path, snapshot: Path, files: list[tuple[Path, str, int]],
                   gzip: bool, manifest: dict[str, Any]) -> int:
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds keys
    listed: list[dict[str, Any]] = []
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz" if gzip else "w",
                                                  format=tarfile.PAX_FORMAT) as tar:
        db_sha = _add(tar, DATABASE, snapshot, snapshot.stat().st_size, 0o600)
        for path, rel, size in files:
            try:
                sha = _add(tar, FILES + rel, path, size, path.stat().st_mode & 0o777)
            except FileNotFoundError:  # deleted since it was listed (a document removed)
                continue
            listed.append({"path": rel, "size": size, "sha256": sha})
        manifest = {**manifest, "database": {"size": snapshot.stat().st_size, "sha256": db_sha},
                    "files": listed}
        body = json.dumps(manifest, indent=1).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mtime, info.mode = len(body), int(time.time()), 0o600
        tar.addfile(info, io.BytesIO(body))
    return len(listed)


def _add(tar: tarfile.TarFile, name: str, path: Path, size: int, mode: int) -> str:
    """Add ``size`` bytes of ``path`` (a file that grows meanwhile is cut at that size)."""
    with path.open("rb") as f:
        reader = _HashingReader(f)
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, int(path.stat().st_mtime), mode
        try:
            tar.addfile(info, reader)
        except OSError as exc:  # tarfile: "unexpected end of data" when it shrank
            raise BackupError(f"{path} changed while it was copied ({exc}); run the backup"
                              " again") from exc
        return reader.digest.hexdigest()


class _HashingReader:
    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.digest.update(data)
        return data


# --- restore ---------------------------------------------------------------------------------

def restore_backup(settings: Settings, archive: Path, min_free_mb: int) -> RestoreReport:
    from .datadir import exclusive

    data_dir = settings.data_dir
    if not archive.is_file():
        raise RestoreError(f"{archive} does not exist or is not a file")
    _check_empty(data_dir)
    with exclusive(data_dir, "edgekb restore"):
        staging = data_dir / _STAGING
        shutil.rmtree(staging, ignore_errors=True)  # left by a restore that was cut off
        staging.mkdir(mode=0o700)
        try:
            manifest = _extract_verified(archive, staging, settings, min_free_mb)
            files = len(manifest["files"])
            for entry in sorted(staging.iterdir(), key=lambda p: p.name == DB_NAME):
                os.replace(entry, data_dir / entry.name)  # the database last
            _fsync_dir(data_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return _reopen(settings, manifest, files)


def _check_empty(data_dir: Path) -> None:
    if not data_dir.exists():
        data_dir.mkdir(parents=True, mode=0o700)
        return
    present = sorted(p.name for p in data_dir.iterdir()
                     if p.name not in _ALLOWED_IN_EMPTY and p.name != _STAGING)
    if present:
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise RestoreError(f"{data_dir} is not empty ({shown}); restore into an empty data dir"
                           " (--data-dir), or move these away first")


def _extract_verified(archive: Path, staging: Path, settings: Settings,
                      min_free_mb: int) -> dict[str, Any]:
    try:
        tar = tarfile.open(archive, mode="r:*")  # noqa: SIM115 (closed by the `with` below)
    except (tarfile.TarError, OSError) as exc:
        raise RestoreError(f"{archive} is not an edgekb backup: {exc}") from exc
    with tar:
        manifest = _read_manifest(tar, archive)
        if manifest["embedder"] != settings.models.embedder:
            raise RestoreError(f"the backup's vectors come from the embedder"
                               f" {manifest['embedder']!r}, this configuration uses"
                               f" {settings.models.embedder!r}: restore with"
                               f" --set models.embedder={manifest['embedder']}")
        expected = {DATABASE: manifest["database"]["sha256"]}
        expected.update({FILES + f["path"]: f["sha256"] for f in manifest["files"]})
        sizes = manifest["database"]["size"] + sum(f["size"] for f in manifest["files"])
        ensure_room(settings.data_dir, sizes, min_free_mb, "the restore")
        seen: set[str] = set()
        for member in tar:
            if member.name == MANIFEST:
                continue
            if member.name not in expected or not member.isfile():
                raise RestoreError(f"{archive}: unexpected entry {member.name!r}; not restored")
            rel = DB_NAME if member.name == DATABASE else member.name[len(FILES):]
            dest = staging / rel
            for folder in reversed(dest.relative_to(staging).parents[:-1]):
                (staging / folder).mkdir(mode=0o700, exist_ok=True)  # keys live in some
            source = tar.extractfile(member)
            assert source is not None  # a regular file, checked above
            digest = hashlib.sha256()
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, member.mode & 0o700 or 0o600)
            with os.fdopen(fd, "wb") as out:
                while block := source.read(BLOCK):
                    digest.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != expected[member.name]:
                raise RestoreError(f"{archive}: {rel} does not match its sha256 in the manifest"
                                   " (the archive is damaged); nothing was restored")
            seen.add(member.name)
        missing = sorted(set(expected) - seen)
        if missing:
            raise RestoreError(f"{archive} lacks {', '.join(missing[:3])} (cut short?);"
                               " nothing was restored")
    return manifest


def _read_manifest(tar: tarfile.TarFile, archive: Path) -> dict[str, Any]:
    try:
        member = tar.getmember(MANIFEST)
        raw = tar.extractfile(member)
        manifest = json.loads(raw.read()) if raw else None
    except (KeyError, ValueError, tarfile.TarError, OSError) as exc:
        raise RestoreError(f"{archive} is not an edgekb backup (no readable manifest: {exc})"
                           ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RestoreError(f"{archive}: unknown backup format {manifest.get('format')!r}"
                           if isinstance(manifest, dict) else f"{archive}: bad manifest")
    if manifest["schema_version"] > len(MIGRATIONS):
        raise SchemaTooNew(f"{archive} was made by edgekb {manifest['edgekb']} with database"
                           f" schema {manifest['schema_version']}; this edgekb knows"
                           f" {len(MIGRATIONS)}: restore it with that version or newer")
    for entry in manifest["files"]:
        rel = Path(entry["path"])
        if rel.is_absolute() or ".." in rel.parts or rel.parts[0] in _SKIPPED_TOP:
            raise RestoreError(f"{archive}: refusing the path {entry['path']!r}")
    return manifest


def _reopen(settings: Settings, manifest: dict[str, Any], files: int) -> RestoreReport:
    """Point uploaded documents at their new place, migrate, rebuild the vector indexes."""
    from .engines import embedder_identity, open_catalog
    from .index import Library
    from .store import Store

    entry = open_catalog(settings).get(settings.models.embedder, kind="embedder")
    store = Store(settings.db_path)  # migrates the schema forward
    try:
        old, new = manifest["docs_dir"].rstrip("/") + "/", str(settings.docs_dir) + "/"
        if old != new:
            with store.transaction():
                store.conn.execute(
                    "UPDATE documents SET path = ? || substr(path, ?) WHERE substr(path, 1, ?) = ?",
                    (new, len(old) + 1, len(old), old))
        store.purge_unpublished()  # what the source's ingest had not finished publishing
        library = Library(int(entry.settings["dim"]), settings.data_dir, embedder_identity(entry))
        library.load(store, lambda fn: fn(store))  # rebuilt (no index file), saved
        indexes = {kb: len(library.get(kb)) for kb in store.kbs()}
        version = store.conn.execute("PRAGMA user_version").fetchone()[0]
        counts = _counts(store.conn)
    finally:
        store.close()
    return RestoreReport(settings.data_dir, files, version, counts, indexes)


# --- before a schema migration ---------------------------------------------------------------

def before_migrating(settings: Settings, min_free_mb: int) -> Path | None:
    """Refuse a database from a newer edgekb; back up one that start-up will migrate."""
    if not settings.db_path.is_file():
        return None
    version = schema_version(settings.db_path)
    if version > len(MIGRATIONS):
        raise SchemaTooNew(f"{settings.db_path} has schema {version}, written by a newer edgekb"
                           f" (this one knows {len(MIGRATIONS)}): install that version again,"
                           " or restore a backup made with this one")
    if version == 0 or version == len(MIGRATIONS):
        return None
    folder = settings.data_dir / PRE_UPGRADE_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    target = folder / f"pre-upgrade-schema{version}-{time.strftime('%Y%m%d-%H%M%S')}.tar"
    report = create_backup(settings, target, min_free_mb)
    log.warning("the database schema goes from %d to %d; a backup of the data before it is"
                " in %s", version, len(MIGRATIONS), report.path)
    for old in sorted(folder.glob("pre-upgrade-*.tar"), key=lambda p: p.stat().st_mtime,
                      reverse=True)[PRE_UPGRADE_KEEP:]:
        old.unlink()
    return report.path


def _mb(size: int) -> int:
    return -(-size // (1024 * 1024))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync(path)
