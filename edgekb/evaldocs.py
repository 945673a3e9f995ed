"""Real-document evaluation sets: fetch pinned Debian packages, unpack and convert their manuals.

A set is a folder with ``sources.toml`` (packages pinned by sha256, and the documents taken
out of them) and ``questions.tsv``. The packages come with ``apt-get download`` (the Debian
archive is one of the registries a unit reaches), are checked against their sha256 and kept in
a cache, so a second run is offline. Third-party documents are never committed: only the list.

Conversions, for formats a package does not ship: ``man`` renders a man page as ``man`` shows
it in an 80-column terminal (the text a technician copies from a terminal), ``docx`` converts
an HTML page with pandoc (installed through apt-get when missing and running as root).
Blocking; run it from scripts, tests or a thread.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONVERSIONS = ("copy", "gunzip", "man", "docx")
TOOL_PACKAGES = {"man": "man-db", "pandoc": "pandoc", "dpkg-deb": "dpkg"}


class FetchError(Exception):
    """A package could not be had, or did not match its sha256."""


@dataclass(frozen=True)
class Package:
    name: str
    file: str
    sha256: str


@dataclass(frozen=True)
class DocumentSource:
    name: str      # file name in the corpus (its suffix picks the loader)
    package: str
    member: str    # path inside the package
    convert: str


def load_sources(set_dir: Path) -> tuple[dict[str, Package], list[DocumentSource]]:
    data = tomllib.loads((set_dir / "sources.toml").read_text(encoding="utf-8"))
    packages = {name: Package(name, p["file"], p["sha256"])
                for name, p in data.get("packages", {}).items()}
    documents = [DocumentSource(d["name"], d["package"], d["member"], d["convert"])
                 for d in data.get("documents", [])]
    for doc in documents:
        if doc.package not in packages or doc.convert not in CONVERSIONS:
            raise FetchError(f"{set_dir}/sources.toml: bad document entry {doc}")
    return packages, documents


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _need_tool(tool: str) -> str:
    found = shutil.which(tool)
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, timeout=600,
                       capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", TOOL_PACKAGES[tool]], check=False,
                       env=env, timeout=900, capture_output=True)
        found = shutil.which(tool)
    if not found:
        raise FetchError(f"{tool} is needed to build the evaluation documents "
                         f"(apt-get install {TOOL_PACKAGES[tool]})")
    return found


def fetch_package(package: Package, cache: Path) -> Path:
    """The verified .deb in the cache, downloaded first if it is not there."""
    target = cache / package.file
    if target.exists() and _sha256(target) == package.sha256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # apt writes an epoch ("2:2.10-12") into the file name as "2%3a2.10-12".
    version = urllib.parse.unquote(package.file.split("_")[1])
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        # apt drops privileges to _apt, which cannot write into a root-owned temp dir.
        os.chmod(tmp, 0o777)
        command = ["apt-get", "download", f"{package.name}={version}"]
        result = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=900)
        if result.returncode != 0 and os.geteuid() == 0:  # a fresh machine has no lists yet
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
            result = subprocess.run(command, cwd=tmp, capture_output=True, text=True,
                                    timeout=900)
        got = Path(tmp) / package.file
        if result.returncode != 0 or not got.exists():
            raise FetchError(f"apt-get download {package.name}={version} failed (run "
                             f"apt-get update first?): {result.stderr.strip()[-400:]}")
        if _sha256(got) != package.sha256:
            raise FetchError(f"{package.file}: sha256 differs from the pinned one")
        os.replace(got, target)
    return target


def _extract_member(deb: Path, member: str, dest: Path) -> None:
    dpkg = _need_tool("dpkg-deb")
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "data.tar"
        with tar.open("wb") as out:
            subprocess.run([dpkg, "--fsys-tarfile", str(deb)], stdout=out, check=True,
                           timeout=300)
        with tarfile.open(tar) as archive:
            wanted = next((m for m in archive.getmembers()
                           if m.name.lstrip("./") == member and m.isfile()), None)
            if wanted is None:
                raise FetchError(f"{deb.name} has no {member}")
            source = archive.extractfile(wanted)
            assert source is not None
            dest.write_bytes(source.read())


def _convert(raw: Path, convert: str, dest: Path) -> None:
    if convert == "copy":
        shutil.copyfile(raw, dest)
    elif convert == "gunzip":
        dest.write_bytes(gzip.decompress(raw.read_bytes()))
    elif convert == "man":
        env = {**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0", "LC_ALL": "C.UTF-8"}
        result = subprocess.run([_need_tool("man"), "--no-hyphenation", "--no-justification",
                                 "-E", "UTF-8", "-l", str(raw)], env=env, capture_output=True,
                                timeout=120, check=True)
        # col -b's job: drop the overstrike that marks bold and underline.
        text = result.stdout.decode("utf-8", errors="replace")
        dest.write_text(_strip_overstrike(text), encoding="utf-8")
    elif convert == "docx":
        subprocess.run([_need_tool("pandoc"), "-f", "html", "-t", "docx", "-o", str(dest),
                        str(raw)], check=True, timeout=300, capture_output=True)


def _strip_overstrike(text: str) -> str:
    out: list[str] = []
    for char in text:
        if char == "\b":
            if out:
                out.pop()
            continue
        out.append(char)
    return "".join(out)


def build_set(set_dir: Path, cache: Path) -> list[Path]:
    """The set's documents, built once into ``cache/<set name>/`` (rebuilt when missing)."""
    packages, documents = load_sources(set_dir)
    corpus = cache / set_dir.name
    corpus.mkdir(parents=True, exist_ok=True)
    paths = []
    for doc in documents:
        dest = corpus / doc.name
        if not dest.exists():
            deb = fetch_package(packages[doc.package], cache / "debs")
            with tempfile.TemporaryDirectory() as tmp:
                raw = Path(tmp) / Path(doc.member).name
                _extract_member(deb, doc.member, raw)
                partial = dest.with_name(dest.name + ".part")
                _convert(raw, doc.convert, partial)
                os.replace(partial, dest)
        paths.append(dest)
    return paths
