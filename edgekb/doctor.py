"""`edgekb doctor`: what is wrong with this appliance, and what to do about each thing.

Checked: settings, models (sha256), the database (schema, integrity), the index against it,
disk space and inodes, the clock, TLS files, and the permissions of the data dir and keys.

Each check returns findings: ``problem`` (edgekb cannot work right until it is fixed; the
command exits non-zero), ``warning`` (it works, but look at it) or ``ok``. The checks only
read: the database is opened read-only (never migrated), so the doctor runs beside a server.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import ssl
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .boards import llm_name
from .catalog import file_state
from .config import Settings
from .errors import EmbedderMismatch, ModelError
from .migrations import MIGRATIONS

# A clock before this date was never set (a board without a real-time clock boots in 1970).
EARLIEST_PLAUSIBLE = time.mktime((2025, 1, 1, 0, 0, 0, 0, 0, 0))
CLOCK_SLACK_S = 300.0
MIN_FREE_INODES = 2000
INODE_SHARE = 0.01
CERT_RENEW_S = 30 * 86400
KEY_SUFFIXES = (".key", ".pem", ".jwk", ".secret")
SECRET_DIRS = ("auth",)  # signing keys of the login tokens (security.py)


@dataclass(frozen=True)
class Finding:
    check: str
    level: str          # ok, warning, problem
    message: str
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def ok(check: str, message: str) -> Finding:
    return Finding(check, "ok", message)


def warning(check: str, message: str, fix: str) -> Finding:
    return Finding(check, "warning", message, fix)


def problem(check: str, message: str, fix: str) -> Finding:
    return Finding(check, "problem", message, fix)


def examine(settings: Settings, now: Callable[[], float] = time.time) -> list[Finding]:
    """Every check but the configuration's (which has to pass before a Settings exists)."""
    findings = check_models(settings)
    findings += check_database(settings)
    findings += check_disk(settings)
    findings += check_clock(settings, now())
    # The tls section comes with the security layer; without it there is nothing to check.
    tls = getattr(settings, "tls", None)
    if tls is not None:
        findings += check_tls(tls.certificate, tls.private_key, now())
    findings += check_permissions(settings)
    return findings


# --- models ----------------------------------------------------------------------------------

def check_models(settings: Settings) -> list[Finding]:
    from .engines import open_catalog

    try:
        catalog = open_catalog(settings)
    except ModelError as exc:
        return [problem("models", exc.message, "fix the manifest named by models.manifest, or"
                        " empty that setting to use the one shipped with edgekb")]
    findings = []
    cache = settings.models_cache
    for kind, name in (("llm", llm_name(settings)), ("embedder", settings.models.embedder)):
        try:
            entry = catalog.get(name, kind=kind)
        except ModelError as exc:
            findings.append(problem("models", exc.message,
                                    f"set models.{kind} to one of the {kind} entries"))
            continue
        if "endpoint" in entry.settings:
            findings.append(ok("models", f"{name}: remote LLM at {entry.settings['endpoint']}"))
            continue
        states = {f.name: file_state(cache, entry, f) for f in entry.files}
        missing = [f for f, s in states.items() if s == "missing"]
        corrupt = [f for f, s in states.items() if s == "corrupt"]
        if corrupt:
            findings.append(problem(
                "models", f"{name}: {', '.join(corrupt)} in {cache / name} does not match its"
                " sha256 (damaged or replaced); edgekb refuses to load it",
                f"edgekb models fetch --force {name}"))
        elif missing:
            findings.append(problem("models", f"{name}: {', '.join(missing)} missing from"
                                    f" {cache / name}", f"edgekb models fetch {name}"))
        else:
            findings.append(ok("models", f"{name}: {len(states)} file(s), sha256 verified"))
    return findings


# --- database and index ----------------------------------------------------------------------

def check_database(settings: Settings) -> list[Finding]:
    from .index import Library
    from .store import Store

    db = settings.db_path
    if not db.is_file():
        return [warning("database", f"no database in {settings.data_dir} yet",
                        "add documents: edgekb ingest PATH (or --demo), or upload them on the"
                        " page")]
    try:
        store = Store.inspect(db)
        version = store.conn.execute("PRAGMA user_version").fetchone()[0]
        check = store.conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.Error as exc:
        return [problem("database", f"{db} cannot be read: {exc}",
                        "stop edgekb and restore the newest backup into an empty data dir:"
                        " edgekb restore FILE --data-dir NEW_DIR")]
    try:
        findings = [_schema_finding(version)]
        if check != "ok":
            findings.append(problem("database", f"{db} is damaged: {check}",
                                    "stop edgekb and restore the newest backup into an empty data"
                                    " dir: edgekb restore FILE --data-dir NEW_DIR"))
            return findings
        findings.append(ok("database", f"{db}: integrity check passed"))
        if version <= len(MIGRATIONS):
            findings += _index_findings(settings, store, Library)
        return findings
    finally:
        store.close()


def _schema_finding(version: int) -> Finding:
    known = len(MIGRATIONS)
    if version > known:
        return problem("database", f"schema {version} was written by a newer edgekb (this one"
                       f" knows {known}); this version refuses to start on it",
                       "install the newer edgekb again, or restore a backup made with this one")
    if version < known:
        return warning("database", f"schema {version}: the next start migrates it to {known}",
                       "nothing to do: a backup of the data before it is kept in"
                       " <data_dir>/backups/")
    return ok("database", f"schema {version} (current)")


def _index_findings(settings: Settings, store: Any, library_cls: Any) -> list[Finding]:
    from .engines import embedder_identity, open_catalog

    try:
        entry = open_catalog(settings).get(settings.models.embedder, kind="embedder")
        identity = embedder_identity(entry)
    except ModelError:
        identity = ""  # the models check reports it; the vectors' origin is not compared
    findings = []
    library = library_cls(0, settings.data_dir, identity)  # dim unused: nothing is loaded
    for kb in store.kbs():
        try:
            reason = library.get(kb).mismatch(store)
        except EmbedderMismatch as exc:
            findings.append(problem("index", exc.message, f"stop edgekb, run edgekb reindex"
                                    f" --kb {kb}, start it again"))
            continue
        if reason is None:
            findings.append(ok("index", f"{kb}: index matches the database"))
        else:
            findings.append(problem("index", f"{kb}: {reason}; searches miss what differs",
                                    "restart edgekb (systemctl restart edgekb): it rebuilds the"
                                    " index from the database at start-up"))
    return findings


# --- disk ------------------------------------------------------------------------------------

def check_disk(settings: Settings) -> list[Finding]:
    folder = _existing(settings.data_dir)
    floor = settings.storage.min_free_mb
    free_mb = shutil.disk_usage(folder).free // (1024 * 1024)
    fix = (f"free space on the disk of {folder}: old archives in {settings.data_dir}/backups/,"
           " documents no longer needed; or lower retention.max_mb")
    findings = []
    if free_mb < floor:
        findings.append(problem("disk", f"{free_mb} MB free, below storage.min_free_mb ({floor}):"
                                " new questions and uploads are refused", fix))
    elif free_mb < 2 * floor:
        findings.append(warning("disk", f"{free_mb} MB free, near storage.min_free_mb ({floor})",
                                fix))
    else:
        findings.append(ok("disk", f"{free_mb} MB free (floor {floor} MB)"))
    fs = os.statvfs(folder)
    if fs.f_files:  # 0 where the file system has no inode limit (btrfs)
        low = max(MIN_FREE_INODES, int(fs.f_files * INODE_SHARE))
        if fs.f_favail < low:
            findings.append(problem("disk", f"{fs.f_favail} inodes free of {fs.f_files}: no new"
                                    " file can be created soon", "delete many small files on"
                                    f" the disk of {folder} (logs, caches)"))
        else:
            findings.append(ok("disk", f"{fs.f_favail} inodes free"))
    return findings


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# --- clock -----------------------------------------------------------------------------------

def check_clock(settings: Settings, now: float) -> list[Finding]:
    """TLS certificates and login tokens are judged by this clock, and retention ages too."""
    shown = time.strftime("%Y-%m-%d %H:%M", time.localtime(now))
    fix = ("turn on time synchronisation (timedatectl set-ntp true) with a reachable time"
           " server, or set it: timedatectl set-time 'YYYY-MM-DD HH:MM'")
    if now < EARLIEST_PLAUSIBLE:
        return [problem("clock", f"the clock says {shown}: it was never set (a board without"
                        " a real-time clock); certificates and tokens fail", fix)]
    newest = _newest_stored(settings.db_path)
    if newest is not None and newest > now + CLOCK_SLACK_S:
        stored = time.strftime("%Y-%m-%d %H:%M", time.localtime(newest))
        return [problem("clock", f"the clock went back: it says {shown}, the newest stored data"
                        f" is from {stored}", fix)]
    synced = _ntp_synchronized()
    if synced is False:
        return [warning("clock", f"the clock ({shown}) is not synchronised to a time server",
                        fix)]
    return [ok("clock", f"{shown}" + (", synchronised" if synced else ""))]


def _newest_stored(db: Path) -> float | None:
    if not db.is_file():
        return None
    try:
        conn = sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema")}
            parts = [f"SELECT max({column}) AS v FROM {table}" for table, column in
                     (("sessions", "updated_at"), ("turns", "created_at"),
                      ("documents", "ingested_at")) if table in tables]
            if not parts:
                return None
            return conn.execute(f"SELECT max(v) FROM ({' UNION ALL '.join(parts)})"
                                ).fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return None  # the database check reports an unreadable database


def _ntp_synchronized() -> bool | None:
    """systemd's view (timedatectl); None where it cannot tell."""
    if shutil.which("timedatectl") is None:
        return None
    try:
        result = subprocess.run(["timedatectl", "show", "--property=NTPSynchronized",
                                 "--value"], capture_output=True, text=True, timeout=5,
                                check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    answer = result.stdout.strip()
    return {"yes": True, "no": False}.get(answer) if result.returncode == 0 else None


# --- TLS ------------------------------------------------------------------------------------

def check_tls(certificate: str, private_key: str, now: float) -> list[Finding]:
    """The configured pair loads, matches, is valid now and for a while, and the key is closed
    to other users."""
    if not certificate and not private_key:
        return [ok("tls", "not configured: the page is served over plain http")]
    if not certificate or not private_key:
        return [problem("tls", "only one of tls.certificate and tls.private_key is set",
                        "set both, or neither")]
    cert, key = Path(certificate).expanduser(), Path(private_key).expanduser()
    for path in (cert, key):
        if not path.is_file():
            return [problem("tls", f"{path} does not exist", "edgekb tls self-signed makes a"
                            " pair, or point the setting at your certificate files")]
    findings = []
    if key.stat().st_mode & stat.S_IRWXO:
        findings.append(problem("tls", f"the private key {key} can be read by other users",
                                f"chmod 600 {key}"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        return [*findings, problem("tls", f"{cert} and {key} do not load as a pair: {exc}",
                                   "use the key the certificate was issued for")]
    window = _validity(cert)
    if window is None:
        return [*findings, ok("tls", f"{cert} loads with its key")]
    begins, ends = window
    until = time.strftime("%Y-%m-%d", time.gmtime(ends))
    if now < begins:
        findings.append(problem("tls", f"{cert} is valid only from"
                                f" {time.strftime('%Y-%m-%d', time.gmtime(begins))}: browsers"
                                " refuse it (is the clock wrong?)", "check the clock first"))
    elif now > ends:
        findings.append(problem("tls", f"{cert} expired on {until}", "renew the certificate"
                                " (edgekb tls self-signed for a new self-signed one)"))
    elif ends - now < CERT_RENEW_S:
        findings.append(warning("tls", f"{cert} expires on {until}", "renew it soon"))
    else:
        findings.append(ok("tls", f"{cert} loads with its key, valid until {until}"))
    return findings


def _validity(cert: Path) -> tuple[float, float] | None:
    """(not before, not after) of a PEM certificate, read by the openssl program."""
    if shutil.which("openssl") is None:
        return None
    try:
        result = subprocess.run(["openssl", "x509", "-noout", "-startdate", "-enddate", "-in",
                                 str(cert)], capture_output=True, text=True, timeout=10,
                                check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    dates = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    try:
        return (ssl.cert_time_to_seconds(dates["notBefore"]),
                ssl.cert_time_to_seconds(dates["notAfter"]))
    except (KeyError, ValueError):
        return None


# --- permissions -----------------------------------------------------------------------------

def check_permissions(settings: Settings) -> list[Finding]:
    """The data dir holds conversations, documents and keys: other users must not read them,
    nor write anything. A file counts only if its folder lets others (or the group) reach it."""
    data_dir = settings.data_dir
    if not data_dir.exists():
        return []
    findings = []
    mode = data_dir.stat().st_mode
    fix = f"chmod 700 {data_dir} (under systemd, StateDirectoryMode=0700 does it)"
    if mode & stat.S_IWOTH:
        findings.append(problem("permissions", f"{data_dir} is writable by every user: anyone"
                                " on this machine can replace the database", fix))
    if os.geteuid() != 0 and data_dir.stat().st_uid != os.geteuid():
        findings.append(problem("permissions", f"{data_dir} belongs to uid"
                                f" {data_dir.stat().st_uid}, not to this user ({os.geteuid()})",
                                f"chown -R {os.geteuid()} {data_dir}, or run as its owner"))
    exposed = [(path, secret) for path, secret in _sensitive_files(data_dir)
               if path.stat().st_mode & _readers(data_dir, path.parent) &
               (stat.S_IRGRP | stat.S_IROTH if secret else stat.S_IROTH)]
    for path, secret in exposed:
        what = "a key" if secret else "conversations"
        findings.append(problem("permissions", f"{path} ({what}) can be read by other users"
                                f" (mode {stat.filemode(path.stat().st_mode)} in a folder they"
                                " can enter)", f"chmod 600 {path}, and {fix}"))
    if not exposed and mode & (stat.S_IROTH | stat.S_IXOTH):
        findings.append(warning("permissions", f"{data_dir} is open to every user on this"
                                " machine (documents, index)", fix))
    if not findings:
        findings.append(ok("permissions", f"{data_dir}: closed to other users"))
    return findings


def _sensitive_files(data_dir: Path) -> list[tuple[Path, bool]]:
    """(path, is a key) of what must stay private: keys (closed to the group too), and the
    database and the audit trail (closed to others)."""
    found = []
    for path in sorted(data_dir.iterdir()):
        if path.is_dir() and path.name in SECRET_DIRS:
            found += [(f, True) for f in sorted(path.rglob("*")) if f.is_file()]
        elif path.is_file() and path.suffix in KEY_SUFFIXES:
            found.append((path, True))
        elif path.is_file() and path.name.startswith(("edgekb.db", "audit.log")):
            found.append((path, False))
    return found


def _readers(data_dir: Path, folder: Path) -> int:
    """The read bits of those who can reach ``folder``: every folder from it up to the data dir
    must let them through (x for others, x for the group)."""
    reach = stat.S_IROTH | stat.S_IRGRP
    part = folder
    while True:
        mode = part.stat().st_mode
        if not mode & stat.S_IXOTH:
            reach &= ~stat.S_IROTH
        if not mode & stat.S_IXGRP:
            reach &= ~stat.S_IRGRP
        if part in (data_dir, part.parent):
            return reach
        part = part.parent
