"""Loaders on real upstream manuals (Debian packages pinned by sha256, see
tests/data/realdocs): titles a technician can read, a location for every format, no page
furniture. The documents are fetched into .cache/docs once (scripts/fetch_eval_docs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekb.evaldocs import build_set
from edgekb.evaluation import docs_cache
from edgekb.loaders import LoadedDocument, load_document

SETS = Path(__file__).parent / "data" / "realdocs"


@pytest.fixture(scope="module")
def docs() -> dict[str, Path]:
    paths = build_set(SETS / "upstream", docs_cache()) + build_set(SETS / "heldout", docs_cache())
    return {p.name: p for p in paths}


def load(docs: dict[str, Path], name: str) -> LoadedDocument:
    return load_document(docs[name], docs[name].read_bytes())


def headings(document: LoadedDocument) -> list[str]:
    return [s.heading for s in document.sections]


def test_every_real_document_loads_with_a_title_and_locations(docs: dict[str, Path]) -> None:
    for name in docs:
        document = load(docs, name)
        assert sum(c.isalpha() for c in document.title) >= 3, (name, document.title)
        assert "  " not in document.title, name
        assert "\u00b6" not in document.title, name
        located = [s for s in document.sections if s.heading or s.page]
        # Nearly every section can be cited by where it is (a preamble may have no heading).
        assert len(located) >= 0.7 * len(document.sections), (name, headings(document)[:5])
        for section in document.sections:
            assert "\u00b6" not in section.heading and "  " not in section.heading, name


def test_man_page_title_and_entries(docs: dict[str, Path]) -> None:
    chronyc = load(docs, "chronyc.txt")
    assert chronyc.title == "chronyc - command-line interface for chrony daemon"
    conf = load(docs, "chrony.conf.txt")
    makestep = next(s for s in conf.sections if s.heading.endswith("makestep threshold limit"))
    assert makestep.heading.startswith("Directives")
    assert "makestep 0.1 3" in makestep.text
    everything = "\n".join(s.text for s in conf.sections)
    assert "CHRONY.CONF(5)" not in everything  # header and footer lines are furniture


def test_faq_sections_are_its_questions_without_the_table_of_contents(
        docs: dict[str, Path]) -> None:
    faq = load(docs, "chrony-faq.txt")
    server = next(s for s in faq.sections
                  if s.heading.endswith("2.2. How do I make an NTP server?"))
    assert "allow directive" in server.text
    everything = "\n".join(s.text for s in faq.sections)
    assert "? 2.2. How do I make an NTP server?" not in everything


def test_sphinx_pages_lose_navigation_and_pilcrows(docs: dict[str, Path]) -> None:
    for name, title in (("frr-bfd.html", "Bidirectional Forwarding Detection (FRR)"),
                        ("frr-vrrp.docx", "VRRP (FRR)")):
        document = load(docs, name)
        assert document.title == title
        last = {h.rsplit(" > ", 1)[-1].lower() for h in headings(document)}
        assert not last & {"navigation", "table of contents", "this page", "next topic"}
        assert all("\u00b6" not in s.text for s in document.sections), name


def test_restructuredtext_headings_and_pdf_pages(docs: dict[str, Path]) -> None:
    ssl = load(docs, "lighttpd-ssl.txt")
    assert ssl.title == "Secure HTTP"
    assert "Description > Configuration" in headings(ssl)
    avrdude = load(docs, "avrdude.pdf")
    assert avrdude.title == "AVRDUDE"
    assert [s.page for s in avrdude.sections] == sorted(s.page for s in avrdude.sections)
