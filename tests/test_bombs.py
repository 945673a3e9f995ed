"""Decompression bombs: a 2 MiB DOCX that inflates to 2 GiB while declaring 100 KB, a PDF whose
one content stream inflates to 2 GiB, and honest documents over the ceilings. Each is refused
with a typed error, with the peak memory of a normal document, and the store is unharmed."""

from __future__ import annotations

import io
import subprocess
import sys
import zlib
from pathlib import Path

import docx
import pytest
from conftest import edgekb_env, run_edgekb
from securelib import docx_bomb, pdf_bomb, zip_bytes

from edgekb.errors import DocumentTooLarge
from edgekb.evaluation import pdf_bytes
from edgekb.loaders import InflateLimits, load_document

MiB = 1 << 20
# Runs a command and prints the peak RSS of its process tree's largest member, in KiB.
PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def real_docx(paragraphs: int = 40) -> bytes:
    document = docx.Document()
    document.add_heading("Compressor C-7", level=1)
    for n in range(paragraphs):
        document.add_paragraph(f"Step {n}: check the oil level and the belt tension.")
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def ingest_peak(data_dir: Path, path: Path, models_cache: Path) -> tuple[int, str]:
    """(peak RSS in MB, stderr) of `edgekb ingest path`."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK, sys.executable, "-m", "edgekb", "ingest", str(path),
         "--data-dir", str(data_dir)], env=edgekb_env(models_cache), capture_output=True,
        text=True, timeout=300, check=False)
    return int(result.stdout.split()[-1]) // 1024, result.stderr


def test_a_docx_bomb_is_refused_with_the_memory_of_a_normal_document(
        tmp_path: Path, models_cache: Path) -> None:
    normal = tmp_path / "manual.docx"
    normal.write_bytes(real_docx())
    bomb = tmp_path / "bomb.docx"
    bomb.write_bytes(docx_bomb(real_docx(), inflated_mib=2048, declared=100_000))
    assert bomb.stat().st_size < 3 * MiB
    data_dir = tmp_path / "data"
    normal_mb, normal_log = ingest_peak(data_dir, normal, models_cache)
    assert "1 added" in normal_log
    bomb_mb, bomb_log = ingest_peak(data_dir, bomb, models_cache)
    assert "[too_large]" in bomb_log and "zip bomb" in bomb_log
    assert "0 added" in bomb_log and "1 failed" in bomb_log
    assert bomb_mb < normal_mb + 50, (bomb_mb, normal_mb)
    print(f"peak RSS: normal {normal_mb} MB, 2 GiB bomb {bomb_mb} MB")
    listed = run_edgekb(["search", "belt tension", "--data-dir", str(data_dir), "--json"],
                        edgekb_env(models_cache), check=True)
    assert "manual.docx" in listed.stdout  # what was stored before is intact


def test_a_pdf_stream_bomb_is_refused_before_pypdf_inflates_it(tmp_path: Path) -> None:
    probe = ("import resource, sys; from pathlib import Path; "
             "from edgekb.loaders import load_document\n"
             "p = Path(sys.argv[1])\ntry:\n    load_document(p, p.read_bytes()); print('ok')\n"
             "except Exception as e:\n    print(type(e).__name__)\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)")
    normal, bomb = tmp_path / "n.pdf", tmp_path / "bomb.pdf"
    normal.write_bytes(pdf_bytes([["Check the oil level."]]))
    bomb.write_bytes(pdf_bomb(2048))
    outputs = [subprocess.run([sys.executable, "-c", probe, str(p)], capture_output=True,
                              text=True, timeout=120, check=True).stdout.split()
               for p in (normal, bomb)]
    assert outputs[0][0] == "ok" and outputs[1][0] == "DocumentTooLarge"
    assert int(outputs[1][1]) < int(outputs[0][1]) + 50, outputs


def test_honest_parts_count_against_the_part_and_the_document_ceiling(tmp_path: Path) -> None:
    limits = InflateLimits(part_bytes=1 * MiB, document_bytes=3 * MiB)
    text = real_docx()
    with_big_part = _add_members(text, {"word/media/big.bin": b"x" * (MiB + 1)})
    with pytest.raises(DocumentTooLarge, match="big.bin"):
        load_document(tmp_path / "a.docx", with_big_part, limits)
    four_parts = _add_members(text, {f"word/media/p{n}.bin": b"y" * (MiB - 10)
                                     for n in range(4)})
    with pytest.raises(DocumentTooLarge, match="over the 3 MB limit"):  # on declarations
        load_document(tmp_path / "b.docx", four_parts, limits)
    assert load_document(tmp_path / "c.docx", text, limits).sections  # within both: loads


def test_pdf_pages_count_against_the_document_ceiling(tmp_path: Path) -> None:
    page = ["x" * 90] * 40  # about 3.7 KB of content per page
    pdf = _flate_pages(pdf_bytes([page] * 40))  # about 150 KB inflated in all
    with pytest.raises(DocumentTooLarge, match="in all"):
        load_document(tmp_path / "p.pdf", pdf, InflateLimits(1 * MiB, 64 * 1024))
    assert len(load_document(tmp_path / "p.pdf", pdf,
                             InflateLimits(1 * MiB, 1 * MiB)).sections) == 40


def _add_members(docx_data: bytes, extra: dict[str, bytes]) -> bytes:
    import zipfile
    with zipfile.ZipFile(io.BytesIO(docx_data)) as source:
        parts = {info.filename: source.read(info) for info in source.infolist()}
    parts.update(extra)
    members = []
    for name, data in parts.items():
        packed = zlib.compressobj(6, zlib.DEFLATED, -15)
        raw = packed.compress(data) + packed.flush()
        members.append((name, 8, raw, zlib.crc32(data), len(data)))
    return zip_bytes(members)


def _flate_pages(pdf: bytes) -> bytes:
    """The same PDF with every content stream FlateDecode-compressed (via pypdf)."""
    from pypdf import PdfReader, PdfWriter
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf)))
    for page in writer.pages:
        page.compress_content_streams()
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
