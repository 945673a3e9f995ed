"""Plain text and Markdown, and the one place bytes become text for every text-like format."""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import charset_normalizer

from ..errors import UnsupportedFormat
from .base import LoadedDocument, Outline, Section, TextBudget, stem_title, title_from_text

_BOMS = (  # UTF-32 first: its little-endian BOM starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_SNIFF_BYTES = 64 * 1024
_MAX_CHAOS = 0.2  # charset-normalizer's "mess" ratio above which its guess is not trusted
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


def _sniff_legacy(sample: bytes) -> str | None:
    """Cyrillic (cp1251, KOI8-R), Japanese (Shift-JIS, EUC-JP) and other legacy charsets by
    charset-normalizer's language model; None when it is unsure (then Windows-1252, as
    browsers do). Only non-ASCII bytes tell encodings apart, so pure ASCII never gets here."""
    best = charset_normalizer.from_bytes(sample).best()
    if best is None or best.encoding in ("ascii", "utf_8"):
        return None
    return best.encoding if best.chaos <= _MAX_CHAOS else None


def _candidate_codecs(sample: bytes, declared: str | None) -> Iterator[str | None]:
    """Charsets to try, in order. A generator: each sniff walks the sample in Python (the CJK
    one was 1.6 % of a Markdown folder's ingest time) and runs only when what came before it
    failed to decode, and almost every file is UTF-8."""
    yield declared
    yield "utf-8"
    yield _sniff_cjk(sample)
    yield _sniff_legacy(sample)
    yield "cp1252"


def decode_text(path: Path, data: bytes, declared: str | None = None) -> str:
    """Bytes -> text: BOM, then the declared charset, UTF-8, GB18030/Big5, the legacy
    charset charset-normalizer finds, Windows-1252."""
    for bom, codec in _BOMS:
        if data.startswith(bom):  # a BOM is a firm declaration: a stray bad byte is replaced
            return data[len(bom):].decode(codec, errors="replace")
    if _looks_binary(data[:_SNIFF_BYTES]):
        raise UnsupportedFormat(f"{path.name}: looks like a binary file, not text")
    declared = _ALIASES.get(declared.lower(), declared) if declared else None
    for codec in _candidate_codecs(data[:_SNIFF_BYTES], declared):
        if codec is None:
            continue
        try:
            return data.decode(codec)
        except (UnicodeDecodeError, LookupError):
            continue
    return data.decode("latin-1")  # cp1252 leaves five bytes undefined; Latin-1 none


_MAN_HEADER = re.compile(r"^(\S+)\((\w+)\)\s.*\s\1\(\2\)\s*$")
_MAN_SECTION = re.compile(r"^[A-Z][A-Z0-9 ,/&()-]{1,40}$")   # NAME, SEE ALSO: column 0
_MAN_SUBSECTION = re.compile(r"^ {3}\S.{0,80}$")            # .SS, 3 columns in
_MAN_ENTRY = re.compile(r"^ {7}([^\s\u2022].{0,90})$")  # .TP tag: an option, a directive
_UNDERLINE = re.compile(r"^\s*([=\-~^*#])\1{2,}\s*$")        # setext / reStructuredText
_NUMBERED = re.compile(r"^\d+(\.\d+)*\.?\s+\S.{0,100}$")      # "2.2. How do I make ...?"
# "  ? 2.2. How do I ...", "  o 1. chrony compared ...": an indented, bulleted, numbered line
_TOC_LINE = re.compile(r"^\s+[?o*\u2022]\s+\d+(\.\d+)*\.?\s+.{1,100}$")
_DOT_LEADER = re.compile(r"(\.\s?){5,}\s*\d+\s*$")             # "Contents ........ 12"
_FAQ_QUESTION = re.compile(r"^Q[:.]\s+(\S.*)$")                 # "Q: Why does dnsmasq ..."


def load_text(path: Path, data: bytes) -> LoadedDocument:
    """Plain text, split at the headings it has: man page sections and entries, setext or
    reStructuredText underlines, numbered FAQ headings; tables of contents are left out."""
    text = TextBudget(path).take(decode_text(path, data))
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    header = _MAN_HEADER.match(first.strip())
    if header:
        return _man_page(path, lines, header.group(0).strip())
    return _plain(path, text, lines)


def _man_page(path: Path, lines: list[str], header: str) -> LoadedDocument:
    """`man` output: sections at column 0, subsections at 3, entries (options, directives)
    at 7 with their text at 11. Header and footer lines are page furniture."""
    outline = Outline()
    name = header.split("(")[0]
    title, in_name = "", False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped == header or (stripped.endswith(header.split()[-1]) and i > len(lines) - 4):
            continue  # the page header, and the footer "chrony 4.3  2022-08-29  CHRONYC(1)"
        if _MAN_SECTION.match(line):
            in_name = stripped == "NAME"
            outline.heading(1, stripped.title())
        elif in_name and stripped and not title:
            title = " ".join(stripped.split())
            outline.add(line)
        elif _MAN_SUBSECTION.match(line) and _blank(lines, i - 1):
            outline.heading(2, " ".join(stripped.split()))
        elif _MAN_ENTRY.match(line) and _after_break(lines, i) and _indented(lines, i + 1, 11):
            outline.heading(3, " ".join(stripped.split()))
            outline.add(stripped)  # the entry's own line is part of its text
        else:
            outline.add(line.strip())
    outline.flush()
    return LoadedDocument(title or name, "txt", outline.sections)


def _after_break(lines: list[str], i: int) -> bool:
    """Line i starts a block: after an empty line or right under a section heading."""
    return _blank(lines, i - 1) or bool(_MAN_SECTION.match(lines[i - 1]))


def _blank(lines: list[str], i: int) -> bool:
    return i < 0 or not lines[i].strip()


def _indented(lines: list[str], i: int, columns: int) -> bool:
    return i < len(lines) and lines[i].startswith(" " * columns) and bool(lines[i].strip())


def _plain(path: Path, text: str, lines: list[str]) -> LoadedDocument:
    outline = Outline()
    title = ""
    levels: dict[str, int] = {}  # underline character -> level, in order of appearance
    skip = 0
    for i, line in enumerate(lines):
        if skip:
            skip -= 1
            continue
        stripped = line.strip()
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        over = _UNDERLINE.match(line)
        if over and i + 2 < len(lines) and _UNDERLINE.match(lines[i + 2]) and lines[i + 1].strip():
            # Over- and underlined: the document title in reStructuredText.
            if not title:
                title = lines[i + 1].strip()
                outline.reset()
            else:
                outline.heading(1, lines[i + 1].strip())
            skip = 2
            continue
        under = _UNDERLINE.match(nxt)
        # A table's header row over its "=====" rule is no heading: columns have wide gaps.
        if (stripped and under and len(nxt.strip()) >= len(stripped) - 2
                and len(stripped) <= 100 and "  " not in stripped):
            level = levels.setdefault(under.group(1), len(levels) + 1)
            outline.heading(level, stripped)
            skip = 1
            continue
        if _DOT_LEADER.search(line) or (_TOC_LINE.match(line) and _in_toc(lines, i)):
            continue  # a table of contents line: the section itself follows
        if (_NUMBERED.match(line) and _blank(lines, i - 1) and _blank(lines, i + 1)):
            number = stripped.split()[0].rstrip(".")
            outline.heading(number.count(".") + 1, stripped)
            continue
        question = _FAQ_QUESTION.match(line) if _blank(lines, i - 1) else None
        if question:
            # A "Q:"/"A:" FAQ: each entry is a section named by its question, so an answer
            # is cited by the question it answers and chunked apart from its neighbours.
            skip = _continuation(lines, i)
            asked = " ".join([question.group(1), *(l.strip() for l in lines[i + 1: i + 1 + skip])])
            outline.heading(len(levels) + 1, asked)
            continue
        outline.add(line)
    outline.flush()
    sections = outline.sections or [Section("", None, text)]
    first = next((line for line in lines if line.strip()), "")
    # A FAQ that opens with its first question: that is no title for the whole file.
    fallback = stem_title(path) if _FAQ_QUESTION.match(first) else title_from_text(path, text)
    return LoadedDocument(title or fallback, "txt", sections)


def _continuation(lines: list[str], i: int) -> int:
    """How many indented lines after line i go on with it (a question over two lines)."""
    count = 0
    while (i + 1 + count < len(lines) and lines[i + 1 + count][:1].isspace()
           and lines[i + 1 + count].strip()):
        count += 1
    return count


def _in_toc(lines: list[str], i: int) -> bool:
    """A numbered, indented line among others like it: a table of contents entry."""
    near = lines[max(0, i - 3): i + 4]
    return sum(1 for line in near if _TOC_LINE.match(line)) >= 2


_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)\s*$")


def load_markdown(path: Path, data: bytes) -> LoadedDocument:
    """Split at ATX ("## x") and setext ("x" over "===" or "---") headings, keeping the heading
    path; fenced code is never a heading."""
    text = TextBudget(path).take(decode_text(path, data))
    outline = Outline()
    title = ""
    in_fence = False
    lines = text.splitlines()
    skip = False
    for i, line in enumerate(lines):
        if skip:
            skip = False
            continue
        if _FENCE.match(line):
            in_fence = not in_fence
        match = None if in_fence else _HEADING.match(line)
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        setext = None if in_fence or not line.strip() or line.startswith((" " * 4, "|")) \
            else _SETEXT.match(nxt)
        if setext:
            level, heading = (1 if setext.group(1)[0] == "=" else 2), line.strip()
            skip = True
        elif match:
            level, heading = len(match.group(1)), match.group(2)
        else:
            outline.add(line)
            continue
        if level == 1 and not title:
            title = heading
            outline.reset()  # the title is not part of every heading path
        else:
            outline.heading(level, heading)
    outline.flush()
    return LoadedDocument(title or title_from_text(path, text), "markdown", outline.sections)
