"""Loaders on real files written here with the real libraries (pypdf, python-docx, zipfile)."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import docx
import pytest
from pypdf import PdfReader, PdfWriter

from edgekb.chunking import chunk_sections
from edgekb.errors import (
    CorruptDocument,
    DocumentTooLarge,
    EmptyDocument,
    EncryptedDocument,
    UnsupportedFormat,
)
from edgekb.evaluation import pdf_bytes as make_pdf
from edgekb.loaders import LoadedDocument, Section, load_document, supported


def load(path: Path) -> LoadedDocument:
    return load_document(path, path.read_bytes())


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- PDF -------------------------------------------------------------------------------------

def rewrite(pdf: bytes, change) -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf)))
    change(writer)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


THREE_PAGES = [["Pump P-200 operating manual", "Read this manual before use."],
               ["Max pressure is 16 bar."],
               ["Replace the seal every 2000 hours."]]


def test_pdf_keeps_page_numbers_and_text(tmp_path: Path) -> None:
    document = load(write(tmp_path / "pump.pdf", make_pdf(THREE_PAGES)))
    assert document.format == "pdf"
    assert document.title == "Pump P-200 operating manual"
    assert [s.page for s in document.sections] == [1, 2, 3]
    assert "16 bar" in document.sections[1].text
    assert "2000 hours" in document.sections[2].text


def test_pdf_title_from_metadata_and_headings_from_outline(tmp_path: Path) -> None:
    def outline(writer: PdfWriter) -> None:
        writer.add_metadata({"/Title": "P-200 manual"})
        safety = writer.add_outline_item(title="Safety", page_number=0)
        writer.add_outline_item(title="Limits", page_number=1, parent=safety)

    document = load(write(tmp_path / "pump.pdf", rewrite(make_pdf(THREE_PAGES), outline)))
    assert document.title == "P-200 manual"
    assert [s.heading for s in document.sections] == ["Safety", "Safety > Limits",
                                                      "Safety > Limits"]


def test_pdf_with_a_user_password_is_refused(tmp_path: Path) -> None:
    locked = rewrite(make_pdf(THREE_PAGES), lambda w: w.encrypt("secret"))
    with pytest.raises(EncryptedDocument, match="encrypted"):
        load(write(tmp_path / "locked.pdf", locked))


def test_pdf_with_only_an_owner_password_opens(tmp_path: Path) -> None:
    owner_only = rewrite(make_pdf(THREE_PAGES), lambda w: w.encrypt("", owner_password="own"))
    document = load(write(tmp_path / "owner.pdf", owner_only))
    assert "16 bar" in document.sections[1].text


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_truncated_pdf_is_corrupt(tmp_path: Path, cut: float) -> None:
    pdf = make_pdf(THREE_PAGES)
    with pytest.raises(CorruptDocument, match="damaged"):
        load(write(tmp_path / "cut.pdf", pdf[:int(len(pdf) * cut)]))


def test_garbage_named_pdf_is_corrupt(tmp_path: Path) -> None:
    with pytest.raises(CorruptDocument):
        load(write(tmp_path / "junk.pdf", b"%PDF-1.7\n" + bytes(range(256)) * 40))


def test_pdf_without_text_layer_says_so(tmp_path: Path) -> None:
    with pytest.raises(EmptyDocument, match="no text layer"):
        load(write(tmp_path / "scan.pdf", make_pdf([[], []])))


def test_blank_pdf_page_is_skipped_but_numbers_hold(tmp_path: Path) -> None:
    document = load(write(tmp_path / "gap.pdf", make_pdf([["Intro"], [], ["Appendix"]])))
    assert [(s.page, s.text) for s in document.sections] == [(1, "Intro"), (3, "Appendix")]


# --- DOCX ------------------------------------------------------------------------------------

def make_docx(path: Path, title: str = "") -> Path:
    document = docx.Document()
    document.core_properties.title = title
    document.add_heading("Pump P-200", level=0)
    document.add_paragraph("General notes for operators.")
    document.add_heading("Safety", level=1)
    document.add_heading("Lockout", level=2)
    document.add_paragraph("Switch off the main isolator and lock it.")
    table = document.add_table(rows=4, cols=3)
    for r, row in enumerate([("Parameter", "Value", "Unit"), ("Max pressure", "16", "bar"),
                             ("Max temperature", "90", "°C"), ("Flow", "12", "m³/h")]):
        for c, text in enumerate(row):
            table.cell(r, c).text = text
    table.cell(2, 2).merge(table.cell(3, 2))  # a vertical merge spanning two rows
    document.add_heading("Maintenance", level=1)
    document.add_paragraph("Replace the seal every 2000 hours.")
    document.save(path)
    return path


def test_docx_heading_paths_and_whole_table_rows(tmp_path: Path) -> None:
    document = load(make_docx(tmp_path / "pump.docx"))
    assert document.format == "docx"
    assert document.title == "Pump P-200"  # the Title paragraph
    by_heading = {s.heading: s.text for s in document.sections}
    assert by_heading[""] == "General notes for operators."
    lockout = by_heading["Safety > Lockout"]
    assert "Switch off the main isolator" in lockout
    assert "| Max pressure | 16 | bar |" in lockout.splitlines()
    # the merged cell's text stands in both rows, so each row reads whole on its own
    assert "| Flow | 12 | °C m³/h |" in lockout.splitlines()
    assert by_heading["Maintenance"] == "Replace the seal every 2000 hours."


def test_docx_rows_survive_chunking_whole(tmp_path: Path) -> None:
    document = load(make_docx(tmp_path / "pump.docx"))
    chunks = chunk_sections(document.sections, lambda units: [len(u.split()) for u in units],
                            chunk_tokens=8, overlap_tokens=0)
    rows = [line for c in chunks for line in c.text.splitlines() if line.startswith("|")]
    assert "| Max pressure | 16 | bar |" in rows


def test_docx_title_from_core_properties(tmp_path: Path) -> None:
    assert load(make_docx(tmp_path / "p.docx", title="P-200 handbook")).title == "P-200 handbook"


def test_docx_zip_bomb_is_refused_without_inflating(tmp_path: Path) -> None:
    path = tmp_path / "bomb.docx"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        with archive.open("word/document.xml", "w", force_zip64=True) as member:
            block = b"\0" * (1 << 20)
            for _ in range(300):  # 300 MB of zeros, about 300 KB on disk
                member.write(block)
    assert path.stat().st_size < 2 * 2**20
    started = time.monotonic()
    with pytest.raises(DocumentTooLarge, match="zip bomb"):
        load(path)
    assert time.monotonic() - started < 1.0


def test_docx_with_too_many_parts_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "many.docx"
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(10_001):
            archive.writestr(f"word/media/{i}.bin", b"")
    with pytest.raises(DocumentTooLarge, match="parts"):
        load(path)


def test_docx_that_is_not_a_zip_is_corrupt(tmp_path: Path) -> None:
    with pytest.raises(CorruptDocument, match="not a zip"):
        load(write(tmp_path / "fake.docx", b"Just some text pretending to be Word."))


def test_zip_without_word_document_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "sheet.docx"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("xl/workbook.xml", "<workbook/>")
    with pytest.raises(CorruptDocument, match="word/document.xml"):
        load(path)


def test_truncated_docx_is_corrupt(tmp_path: Path) -> None:
    data = make_docx(tmp_path / "whole.docx").read_bytes()
    with pytest.raises(CorruptDocument):
        load(write(tmp_path / "cut.docx", data[: len(data) // 2]))


def test_docx_with_broken_xml_is_corrupt(tmp_path: Path) -> None:
    source = zipfile.ZipFile(make_docx(tmp_path / "whole.docx"))
    path = tmp_path / "broken.docx"
    with source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for item in source.infolist():
            body = source.read(item)
            archive.writestr(item, body[:200] if item.filename == "word/document.xml" else body)
    with pytest.raises(CorruptDocument):
        load(path)


# --- HTML ------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html><head><meta charset="windows-1252"><title>Pump P-200</title>
<style>body { color: red }</style><script>var menu = "<p>not text</p>";</script></head>
<body>
<header><a href="/">ACME home</a> <a href="/shop">Shop</a></header>
<nav><ul><li>Products</li><li>Contact</li></ul></nav>
<main>
  <h1>Pump P-200</h1>
  <p>Centrifugal pump for clean water &amp; light chemicals.</p>
  <h2>Safety</h2>
  <h3>Lockout</h3>
  <p>Lock the main isolator.<br>Then test for zero energy.</p>
  <table><tr><th>Parameter</th><th>Value</th></tr>
         <tr><td>Max pressure</td><td>16 bar</td></tr></table>
  <h2>Maintenance</h2>
  <ul><li>Check the seal.</li><li>Grease the bearing.</li></ul>
</main>
<aside>Related products</aside>
<footer>© ACME, Druckbehälter GmbH</footer>
</body></html>"""


def test_html_keeps_main_text_and_heading_paths(tmp_path: Path) -> None:
    document = load(write(tmp_path / "pump.html", PAGE.encode("cp1252")))
    assert document.format == "html"
    assert document.title == "Pump P-200"
    assert [(s.heading, s.text) for s in document.sections] == [
        ("", "Centrifugal pump for clean water & light chemicals."),
        ("Safety > Lockout", ("Lock the main isolator.\nThen test for zero energy.\n\n"
                              "| Parameter | Value |\n| Max pressure | 16 bar |")),
        ("Maintenance", "- Check the seal.\n- Grease the bearing."),
    ]
    everything = " ".join(s.text for s in document.sections)
    for noise in ("ACME home", "Products", "not text", "color", "Related", "©"):
        assert noise not in everything


def test_html_without_main_drops_chrome_and_titles_from_h1(tmp_path: Path) -> None:
    page = ("<body><nav>Menu</nav><header>Site</header><h1>Valve V-9</h1><p>Intro.</p>"
            "<h2>Fitting</h2><p>Hand-tight plus a quarter turn.</p><footer>Legal</footer></body>")
    document = load(write(tmp_path / "valve.htm", page.encode()))
    assert document.title == "Valve V-9"
    assert [(s.heading, s.text) for s in document.sections] == [
        ("", "Intro."), ("Fitting", "Hand-tight plus a quarter turn.")]


def test_html_attribute_holding_a_closing_bracket_leaks_no_markup(tmp_path: Path) -> None:
    page = ('<body><h1 title="a > b">Valve V-9</h1><p>Open <a href="#x" data-x=\'1 > 0\' '
            'class="ref">the vent</a> first.</p></body>')
    document = load(write(tmp_path / "valve.html", page.encode()))
    text = " ".join(s.text for s in document.sections)
    assert document.title == "Valve V-9"
    assert text == "Open the vent first."


def test_hostile_html_is_read_in_linear_time(tmp_path: Path) -> None:
    # html.parser needs minutes for this (quadratic); libxml2 for the misnested tags
    hostile = ("<a " * 100_000 + "<b>x</i>" * 100_000 + '<a "' * 50_000 + "<!--").encode()
    started = time.monotonic()
    load(write(tmp_path / "hostile.html", hostile))
    assert time.monotonic() - started < 10


# --- text ------------------------------------------------------------------------------------

GERMAN = "Druckbehälter prüfen. Größe der Öffnung: 25 mm."
CHINESE = "温度过高时请立即停机。检查压力表！是否泄漏？"
RUSSIAN = ("Перед обслуживанием насоса закройте напорный клапан и отключите питание. "
           "Давление масла должно быть не ниже 2 бар.")
JAPANESE = "ポンプの保守の前に吐出弁を閉じ、電源を切ってください。油圧は2バール以上が必要です。"


@pytest.mark.parametrize(("text", "data"), [
    (GERMAN, GERMAN.encode("utf-8")),
    (GERMAN, GERMAN.encode("utf-8-sig")),
    (GERMAN, GERMAN.encode("utf-16")),  # with BOM
    (GERMAN, b"\xfe\xff" + GERMAN.encode("utf-16-be")),
    (GERMAN, GERMAN.encode("latin-1")),
    ("Preis: 5 € – „gut“", "Preis: 5 € – „gut“".encode("cp1252")),
    (CHINESE, CHINESE.encode("gbk")),
    ("溫度過高時請立即停機。檢查壓力錶！", "溫度過高時請立即停機。檢查壓力錶！".encode("big5")),
    (RUSSIAN, RUSSIAN.encode("cp1251")),
    (RUSSIAN, RUSSIAN.encode("koi8-r")),
    (JAPANESE, JAPANESE.encode("shift_jis")),
], ids=["utf8", "utf8-bom", "utf16-le-bom", "utf16-be-bom", "latin1", "cp1252", "gbk", "big5",
        "cp1251", "koi8-r", "shift-jis"])
def test_text_encodings_decode(tmp_path: Path, text: str, data: bytes) -> None:
    document = load(write(tmp_path / "note.txt", data))
    assert document.sections == [Section("", None, text)]


def test_markdown_uses_the_same_decoding(tmp_path: Path) -> None:
    data = f"# Handbuch\n\n## Prüfung\n\n{GERMAN}\n".encode("latin-1")
    document = load(write(tmp_path / "handbuch.md", data))
    assert document.title == "Handbuch"
    assert document.sections == [Section("Prüfung", None, GERMAN)]


@pytest.mark.parametrize("data", [b"\x7fELF\x02\x01\x01\x00" + bytes(200),
                                  bytes(range(1, 32)) * 20 + b"some text"])
def test_binary_renamed_txt_is_refused(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(UnsupportedFormat, match="binary"):
        load(write(tmp_path / "program.txt", data))


@pytest.mark.parametrize("data", [b"", b"  \n\t\r\n  ", b"\xef\xbb\xbf"])
def test_empty_text_is_refused(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(EmptyDocument):
        load(write(tmp_path / "empty.txt", data))


def test_unknown_suffix_is_unsupported(tmp_path: Path) -> None:
    assert supported(Path("a.PDF")) and supported(Path("b.htm")) and not supported(Path("c.xls"))
    with pytest.raises(UnsupportedFormat, match="supported"):
        load(write(tmp_path / "sheet.xls", b"data"))


def test_chinese_chunks_break_at_sentence_marks(tmp_path: Path) -> None:
    text = "泵启动前必须检查油位。如果油位过低，请加油！电机是否过热？" * 3
    document = load(write(tmp_path / "zh.txt", text.encode("gb18030")))
    chunks = chunk_sections(document.sections, lambda units: [len(u) for u in units],
                            chunk_tokens=20, overlap_tokens=0)
    assert len(chunks) >= 3
    assert all(c.text.replace("\n", "")[-1] in "。！？" for c in chunks)
    assert "".join(c.text.replace("\n", "") for c in chunks) == text


def test_a_question_and_answer_faq_is_split_into_its_entries(tmp_path: Path) -> None:
    # The layout of dnsmasq's FAQ: a question may go on over indented lines.
    data = (b"Q: Why does dnsmasq open UDP ports >1024 as well as port 53.\n"
            b"   Is this a security problem?\n\n"
            b"A: The high ports are for replies from the upstream nameservers.\n\n"
            b"Q: Does dnsmasq answer over TCP?\n\n"
            b"A: From version 2.10, it does.\n")
    document = load(write(tmp_path / "dnsmasq-FAQ.txt", data))
    assert document.title == "dnsmasq FAQ"  # not its first question
    assert document.sections == [
        Section("Why does dnsmasq open UDP ports >1024 as well as port 53. "
                "Is this a security problem?", None,
                "A: The high ports are for replies from the upstream nameservers."),
        Section("Does dnsmasq answer over TCP?", None, "A: From version 2.10, it does."),
    ]
