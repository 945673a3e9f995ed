"""Retrieval evaluation: does search put the answering passage near the top?

An evaluation set is a folder with ``questions.tsv`` and its documents: either real upstream
manuals listed in ``sources.toml`` (fetched and pinned by edgekb.evaldocs, kept in a cache), or
the project's own ``docs/`` (ingested as they are) and ``render/`` (Markdown rendered to the
binary format named by its file name: ``x.docx.md`` -> ``x.docx``), with the demo manuals.
Each question names its document and an exact substring of the answering text: a hit is a
passage of that document containing it, which stays true when chunking changes. Passages are
what an answer is given (passages.py: each section among the best ``retrieval.k`` chunks,
with its sibling chunks), then the best chunk of each other section, for the ranks beyond.
Questions of kind ``absent`` have no answer in any document: they measure what the best score
looks like when nothing is relevant (the not-covered floor), and count in no hit figure.

Blocking; runs the embedder only (no LLM), in a temporary data dir.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docx

from .cli import DEMO_DIR
from .config import load_settings
from .engines import load_embedder, make_ingestor, open_catalog, open_library
from .evaldocs import build_set
from .passages import DEPTH as PASSAGE_DEPTH
from .passages import ranked
from .retrieval import MODES, Searcher, needs_translation
from .store import ChunkHit, Store

KB = "eval"
DEPTH = 10  # passages read per question (the answer's k, then other sections): MRR@10
CUTOFFS = (1, 3, 5)
_PDF_LINE_CHARS = 90
_PDF_PAGE_LINES = 46


ABSENT = "absent"


@dataclass(frozen=True)
class Question:
    id: str
    category: str  # the kind: identifier, lexical, everyday, chinese, absent, ...
    document: str  # file name of the answering document ("" for absent)
    answer: str    # exact substring of the answering chunk's text
    text: str
    lang: str = "en"
    facts: tuple[str, ...] = ()  # key facts a right answer contains (case-insensitive)

    @property
    def covered(self) -> bool:
        return self.category != ABSENT


def load_questions(path: Path) -> list[Question]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    questions = [_question_of(r, r.get("kind") or r["category"]) for r in rows]
    duplicates = [i for i, n in Counter(q.id for q in questions).items() if n > 1]
    if duplicates:
        raise ValueError(f"{path}: duplicate question ids {sorted(duplicates)}")
    return questions


@dataclass(frozen=True)
class FollowUp:
    """The next question of a conversation that began with ``first`` (a question id)."""

    id: str
    kind: str      # short ("and the default?"), pronoun, related, switch (another manual)
    first: str
    question: Question  # the follow-up, with its own answering document and key facts


def load_followups(path: Path, questions: Sequence[Question]) -> list[FollowUp]:
    """A set's ``followups.tsv``; every ``first`` must name an answerable question."""
    known = {q.id for q in questions if q.covered}
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    followups = [FollowUp(r["id"], r["kind"], r["first"], _question_of(r, r["kind"]))
                 for r in rows]
    unknown = sorted(f.first for f in followups if f.first not in known)
    if unknown:
        raise ValueError(f"{path}: follow-ups of unknown or unanswerable questions {unknown}")
    return followups


def _question_of(row: Mapping[str, str], kind: str) -> Question:
    """One row of questions.tsv or followups.tsv (the same columns)."""
    return Question(row["id"], kind, row["document"], row["answer"], row["question"],
                    row.get("lang") or _language(row["question"]),
                    tuple(f for f in (row.get("facts") or "").split("|") if f))


def _normalise(text: str) -> str:
    """Whitespace-insensitive: loaders and chunking join and re-break lines."""
    return " ".join(text.split())


def _markdown_blocks(markdown: str) -> Iterable[tuple[str, list[str]]]:
    """(kind, cells) per line of the small Markdown subset used by render/ sources: kind is a
    heading level "1".."3", "row" (a table row, one cell each), "item" (list item) or "text"."""
    for line in markdown.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            level = len(stripped) - len(stripped.lstrip("#"))
            yield str(level), [stripped[level:].strip()]
        elif stripped.startswith("|"):
            cells = [c.strip() for c in stripped.strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):  # skip the |---| separator
                yield "row", cells
        elif stripped.startswith("- "):
            yield "item", [stripped[2:]]
        else:
            yield "text", [stripped]


def render_docx(markdown: str, path: Path) -> None:
    """Headings as Word heading styles (the title as Title), tables as real Word tables."""
    document = docx.Document()
    rows: list[list[str]] = []

    def flush_table() -> None:
        if rows:
            table = document.add_table(rows=len(rows), cols=len(rows[0]))
            for r, row in enumerate(rows):
                for c, cell in enumerate(row):
                    table.cell(r, c).text = cell
            rows.clear()

    for kind, cells in _markdown_blocks(markdown):
        if kind == "row":
            rows.append(cells)
            continue
        flush_table()
        text = cells[0]
        if kind == "item":
            document.add_paragraph(text, style="List Bullet")
        elif kind == "text":
            document.add_paragraph(text)
        else:
            document.add_heading(text, level=int(kind) - 1)
    flush_table()
    document.save(path)


def render_pdf(markdown: str, path: Path) -> None:
    """A plain PDF as many manuals are: wrapped Helvetica lines, a new page per chapter, table
    cells run together with spaces, no outline."""
    pages: list[list[str]] = [[]]
    for kind, cells in _markdown_blocks(markdown):
        if kind == "2" and pages[-1]:
            pages.append([])
        for wrapped in textwrap.wrap("   ".join(cells), _PDF_LINE_CHARS):
            if len(pages[-1]) >= _PDF_PAGE_LINES:
                pages.append([])
            pages[-1].append(wrapped)
    path.write_bytes(pdf_bytes(pages))


def pdf_bytes(pages: Sequence[Sequence[str]]) -> bytes:
    """A minimal valid PDF: one Helvetica text line per string, one page per list."""
    count = len(pages)
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(count))
    font = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{kids}] /Count {count} >>".encode(), font]
    for i, lines in enumerate(pages):
        ops = b"".join(b"BT /F1 10 Tf 56 %d Td (%s) Tj ET\n" % (770 - 15 * j, _pdf_string(line))
                       for j, line in enumerate(lines))
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources "
                       f"<< /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>".encode())
        objects.append(b"<< /Length %d >>\nstream\n%sendstream" % (len(ops), ops))
    return pdf_file(objects)


def pdf_file(objects: Sequence[bytes]) -> bytes:
    """A PDF of these numbered objects (object 1 the catalog), with its xref table."""
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % offset for offset in offsets))
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n"
              % (len(objects) + 1, xref))
    return out.getvalue()


def _pdf_string(text: str) -> bytes:
    data = text.encode("cp1252")  # WinAnsiEncoding; a character outside it is a bug in the set
    return data.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")


def _language(text: str) -> str:
    return "zh" if any("\u4e00" <= c <= "\u9fff" for c in text) else "en"


def docs_cache() -> Path:
    """Where real evaluation documents are kept (EVAL_DOCS_CACHE, else .cache/docs)."""
    default = Path(__file__).resolve().parent.parent / ".cache" / "docs"
    return Path(os.environ.get("EVAL_DOCS_CACHE", default))


def build_corpus(eval_dir: Path, dest: Path) -> list[Path]:
    """The set's documents: real ones fetched into the cache (sources.toml), or the project's
    own documents copied and rendered into ``dest`` with the demo manuals."""
    if (eval_dir / "sources.toml").exists():
        return build_set(eval_dir, docs_cache())
    dest.mkdir(parents=True, exist_ok=True)
    sources = sorted((eval_dir / "docs").iterdir()) + sorted(DEMO_DIR.iterdir())
    for source in sources:
        shutil.copyfile(source, dest / source.name)
    renderers = {".docx": render_docx, ".pdf": render_pdf}
    for source in sorted((eval_dir / "render").glob("*.md")):
        target = dest / source.stem  # x.docx.md -> x.docx
        renderers[target.suffix](source.read_text(encoding="utf-8"), target)
    return sorted(dest.iterdir())


# What an ingested set depends on: its documents, the code that reads, cuts and embeds them,
# and the settings of the last two. Same digest, same chunks and vectors.
_INGEST_CODE = ("loaders", "chunking.py", "ingest.py", "embed.py", "store.py", "migrations.py")


def _ingest_cache(eval_dir: Path, documents: Sequence[Path], settings: Any) -> Path | None:
    """Where an ingested copy of this set is kept for the next run (real sets only: the
    project's own set ingests in seconds)."""
    if not (eval_dir / "sources.toml").exists():
        return None
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for code in _INGEST_CODE:
        for path in sorted((package / code).rglob("*.py")) if (package / code).is_dir() \
                else [package / code]:
            digest.update(path.read_bytes())
    for path in documents:
        digest.update(path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
    digest.update(repr((settings.chunking, settings.models.embedder)).encode())
    return docs_cache() / "ingested" / f"{eval_dir.name}-{digest.hexdigest()[:16]}"


def _ratios(ranks: Sequence[int | None], cutoffs: Sequence[int], mode: str) -> dict[str, float]:
    n = max(1, len(ranks))
    result = {f"hit_at_{c}_{mode}": sum(1 for r in ranks if r and r <= c) / n for c in cutoffs}
    result[f"mrr_{mode}"] = sum(1 / r for r in ranks if r) / n
    return result


def _check_answers(store: Store, questions: Sequence[Question]) -> None:
    """Every answer key must occur in its document: a typo would count as a miss forever."""
    texts: dict[str, list[str]] = {}
    for hit in store.chunks(store.chunk_ids(KB)).values():
        texts.setdefault(Path(hit.doc_path).name, []).append(_normalise(hit.text))
    broken = [q.id for q in questions if q.covered
              and not any(_normalise(q.answer) in t for t in texts.get(q.document, []))]
    if broken:
        raise ValueError(f"answer text not found in its document for questions {broken}")


def _rank(question: Question, hits: Sequence[ChunkHit]) -> int | None:
    answer = _normalise(question.answer)
    return next((n for n, hit in enumerate(hits, start=1)
                 if Path(hit.doc_path).name == question.document
                 and answer in _normalise(hit.text)), None)


Translate = Callable[[str], str]


def evaluate(eval_dir: Path, *, env: Mapping[str, str] | None = None,
             overrides: Mapping[str, Any] | None = None, k: int = 3,
             modes: Sequence[str] = MODES, translate: Translate | None = None,
             keep: Callable[[Path, Searcher, list[Question]], None] | None = None
             ) -> dict[str, Any]:
    """Ingest the set into a temporary data dir and search every question in every mode.

    ``env`` and ``overrides`` are passed to load_settings (e.g. the model cache, chunk sizes);
    the data dir is always a fresh temporary one. ``translate`` turns a CJK question into an
    English search query, as the answer engine does with its LLM. ``keep`` is called with the
    data dir's database before it is removed (the answer benchmark asks its questions there).
    Returns flat figures over the covered questions (``hit_at_3_hybrid``, ``mrr_vector``,
    ``search_ms_keyword``, ...), the same per kind under ``categories`` and per language under
    ``languages``, and per question the rank of the first hit in each mode (None: not in the
    top DEPTH), the top hybrid result and its relevance under ``results``.
    """
    questions = load_questions(eval_dir / "questions.tsv")
    cutoffs = sorted({*CUTOFFS, k})
    with tempfile.TemporaryDirectory(prefix="edgekb-eval-") as tmp:
        settings = load_settings(env=env, overrides={**(overrides or {}),
                                                     "data_dir": str(Path(tmp) / "data")})
        embedder = load_embedder(settings, open_catalog(settings))
        documents = build_corpus(eval_dir, Path(tmp) / "corpus")
        cached = _ingest_cache(eval_dir, documents, settings)
        if cached is not None and cached.exists():
            shutil.copytree(cached, settings.data_dir)
        library = open_library(settings, embedder)
        store = Store(settings.db_path)
        try:
            library.load(store)  # a cached copy's index (verified against SQLite, as at start)
            started = time.perf_counter()
            report = make_ingestor(settings, store, embedder, library).ingest(documents, kb=KB)
            ingest_s = time.perf_counter() - started
            failed = [r for r in report.results if r.status == "failed"]
            if failed:
                raise ValueError(f"ingest failed: {[r.error for r in failed]}")
            if cached is not None and not cached.exists():
                shutil.copytree(settings.data_dir, cached,
                                ignore=shutil.ignore_patterns("edgekb.lock"))
            _check_answers(store, questions)
            searcher = Searcher(embedder, library)
            alternates = [(translate(q.text),) if translate and needs_translation(q.text)
                          else () for q in questions]
            ranks: dict[str, list[int | None]] = {}
            top: list[str] = []
            best: list[float] = []
            result: dict[str, Any] = {"questions": sum(q.covered for q in questions),
                                      "not_covered_questions": sum(not q.covered
                                                                   for q in questions),
                                      "documents": len(documents),
                                      "chunks": report.chunks, "ingest_s": round(ingest_s, 2)}
            covered = [i for i, q in enumerate(questions) if q.covered]
            for mode in modes:
                started = time.perf_counter()
                found = [ranked(searcher.search(store, q.text, PASSAGE_DEPTH, [KB], mode,
                                                alternates[i]), settings.retrieval.k,
                                 settings.retrieval.sibling_chunks)[:DEPTH]
                         for i, q in enumerate(questions)]
                result[f"search_ms_{mode}"] = round(
                    (time.perf_counter() - started) * 1000 / max(1, len(questions)), 2)
                ranks[mode] = [_rank(q, [s.hit for s in hits]) for q, hits in zip(questions, found)]
                result.update(_ratios([ranks[mode][i] for i in covered], cutoffs, mode))
                if mode == "hybrid":
                    top = [f"{Path(h[0].hit.doc_path).name} > {h[0].hit.heading}" if h else ""
                           for h in found]
                    best = [h[0].relevance if h else 0.0 for h in found]
            if keep is not None:
                keep(settings.db_path, searcher, questions)
        finally:
            store.close()
    result["categories"] = _grouped(questions, ranks, cutoffs, modes, lambda q: q.category)
    result["languages"] = _grouped(questions, ranks, cutoffs, modes, lambda q: q.lang)
    result["results"] = [{"id": q.id, "category": q.category, "lang": q.lang,
                          "question": q.text, "document": q.document,
                          "top_hybrid": top[i] if top else "",
                          "relevance": round(best[i], 4) if best else None,
                          "ranks": {mode: ranks[mode][i] for mode in modes}}
                         for i, q in enumerate(questions)]
    return result


def _grouped(questions: Sequence[Question], ranks: Mapping[str, list[int | None]],
             cutoffs: Sequence[int], modes: Sequence[str],
             key: Callable[[Question], str]) -> dict[str, dict[str, float]]:
    groups: dict[str, dict[str, float]] = {}
    for name in sorted({key(q) for q in questions if q.covered}):
        picked = [i for i, q in enumerate(questions) if q.covered and key(q) == name]
        figures: dict[str, float] = {"count": len(picked)}
        for mode in modes:
            figures.update(_ratios([ranks[mode][i] for i in picked], cutoffs, mode))
        groups[name] = figures
    return groups
