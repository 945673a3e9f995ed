"""Plain text and Markdown, and the one place bytes become text for every text-like format."""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable
from pathlib import Path

from ..errors import UnsupportedFormat
from .base import LoadedDocument, Outline, Section, TextBudget, title_from_text

_BOMS = (  # UTF-32 first: its little-endian BOM starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_SNIFF_BYTES = 64 * 1024
_CONTROL = bytes(b for b in range(32) if b not in b"\t\n\v\f\r\x1b")
# Labels read the way browsers read them (WHATWG): Latin-1 and ASCII mean windows-1252, GB2312
# and GBK mean their superset GB18030, and a UTF-16/32 label on bytes without a BOM is a lie.
_ALIASES = {"iso-8859-1": "cp1252", "latin-1": "cp1252", "latin1": "cp1252",
            "ascii": "cp1252", "us-ascii": "cp1252", "gb2312": "gb18030", "gbk": "gb18030",
            "utf-16": "utf-8", "utf-16le": "utf-8", "utf-16be": "utf-8", "utf-32": "utf-8"}


def _in_gb2312(char: str) -> bool:
    try:
        char.encode("gb2312")
    except UnicodeEncodeError:
        return False
    return True


def _in_big5_level1(char: str) -> bool:
    try:
        return 0xA4 <= char.encode("big5")[0] <= 0xC6
    except UnicodeEncodeError:
        return False


# Legacy Chinese encodings are tried in turn. Almost any byte string decodes as GBK, so a
# decoding only counts when its Han characters are the common ones of that encoding (GB2312 for
# GB18030, Big5 level 1 for Big5): Latin-1 or Big5 bytes misread as GBK land in GBK's rare
# extension areas, and Latin-1 misread as Big5 in its level 2.
_CJK_CODECS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("gb18030", _in_gb2312), ("big5", _in_big5_level1),
)


def _is_han(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf"


def _is_junk(char: str) -> bool:
    """Replacement, private-use and control characters: signs of a wrong guess."""
    return (char == "\ufffd" or "\ue000" <= char <= "\uf8ff"
            or (char < " " and char not in "\t\n\v\f\r") or "\x7f" <= char <= "\x9f")


def _plausible_cjk(text: str, is_common: Callable[[str], bool]) -> bool:
    han = [char for char in text if _is_han(char)]
    if not han or any(_is_junk(char) for char in text):
        return False
    return sum(1 for char in han if is_common(char)) >= 0.9 * len(han)


def _sniff_cjk(sample: bytes) -> str | None:
    for codec, is_common in _CJK_CODECS:
        try:  # incremental, not final: the sample may end inside a character
            text = codecs.getincrementaldecoder(codec)().decode(sample)
        except UnicodeDecodeError:
            continue
        if _plausible_cjk(text, is_common):
            return codec
    return None


def _looks_binary(sample: bytes) -> bool:
    """NUL bytes or many control bytes: an executable, image or archive, not text."""
    controls = len(sample) - len(sample.translate(None, _CONTROL))
    return b"\x00" in sample or controls > len(sample) // 20


def decode_text(path: Path, data: bytes, declared: str | None = None) -> str:
    """Bytes -> text: BOM, then the declared charset, UTF-8, GB18030/Big5, Windows-1252."""
    for bom, codec in _BOMS:
        if data.startswith(bom):  # a BOM is a firm declaration: a stray bad byte is replaced
            return data[len(bom):].decode(codec, errors="replace")
    if _looks_binary(data[:_SNIFF_BYTES]):
        raise UnsupportedFormat(f"{path.name}: looks like a binary file, not text")
    declared = _ALIASES.get(declared.lower(), declared) if declared else None
    guesses = [declared, "utf-8", _sniff_cjk(data[:_SNIFF_BYTES]), "cp1252"]
    for codec in guesses:
        if codec is None:
            continue
        try:
            return data.decode(codec)
        except (UnicodeDecodeError, LookupError):
            continue
    return data.decode("latin-1")  # cp1252 leaves five bytes undefined; Latin-1 none


def load_text(path: Path, data: bytes) -> LoadedDocument:
    text = TextBudget(path).take(decode_text(path, data))
    return LoadedDocument(title_from_text(path, text), "txt", [Section("", None, text)])


_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def load_markdown(path: Path, data: bytes) -> LoadedDocument:
    """Split at ATX headings, keeping the heading path; fenced code is never a heading."""
    text = TextBudget(path).take(decode_text(path, data))
    outline = Outline()
    title = ""
    in_fence = False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        match = None if in_fence else _HEADING.match(line)
        if match is None:
            outline.add(line)
        elif len(match.group(1)) == 1 and not title:
            title = match.group(2)
            outline.reset()  # the title is not part of every heading path
        else:
            outline.heading(len(match.group(1)), match.group(2))
    outline.flush()
    return LoadedDocument(title or title_from_text(path, text), "markdown", outline.sections)
