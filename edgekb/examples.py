"""What an empty page offers: the knowledge bases with their manuals, and example questions
drawn from the manuals' own section headings (so each one has an answer on this appliance).

Blocking functions over a ``Store``, run on a reader thread.
"""

from __future__ import annotations

import re
from typing import Any

from .store import Store

MAX_TITLES = 8       # manuals named per knowledge base
MAX_QUESTIONS = 4
# Section names that say nothing about a machine: no question is made of them.
GENERIC = frozenset({
    "contents", "table of contents", "introduction", "overview", "index", "preface",
    "foreword", "about", "notes", "note", "references", "appendix", "glossary", "copyright",
    "license", "licence", "revision history", "changelog", "summary", "scope", "purpose",
    "general", "symbols", "abbreviations", "definitions", "see also", "name", "synopsis",
    "description", "options", "files", "authors", "author", "bugs", "example", "examples"})
_TITLE_SPLIT = re.compile(r"\s+[—–:|]\s+|\s+-\s+")
_NUMBERING = re.compile(r"^\s*(?:\d+(?:\.\d+)*\.?|[A-Z]\.|[IVX]+\.)\s+")


def overview(store: Store) -> dict[str, Any]:
    """{"kbs": [{name, documents, titles}], "questions": [{text, kb}]}."""
    kbs = []
    for kb in store.kbs():
        docs = store.documents(kb)
        kbs.append({"name": kb, "documents": len(docs),
                    "titles": [d.title for d in docs[:MAX_TITLES]]})
    return {"kbs": kbs, "questions": questions(store)}


def questions(store: Store, limit: int = MAX_QUESTIONS) -> list[dict[str, str]]:
    """One question per manual (the largest manuals first, taking turns between knowledge
    bases), made of its largest informative section; manuals without headings come last."""
    per_kb: dict[str, list[dict[str, str]]] = {}
    plain: list[dict[str, str]] = []
    for kb in store.kbs():
        for doc in sorted(store.documents(kb), key=lambda d: -d.chunk_count):
            name = short_title(doc.title)
            topic = _best_heading(store, doc.id)
            if topic:
                per_kb.setdefault(kb, []).append({"text": _question(name, topic), "kb": kb})
            elif name:
                plain.append({"text": f"What does the {name} cover?", "kb": kb})
    picked: list[dict[str, str]] = []
    for round_ in range(limit):
        for items in per_kb.values():
            if round_ < len(items) and len(picked) < limit:
                picked.append(items[round_])
    return picked + plain[: limit - len(picked)]


def _best_heading(store: Store, doc_id: int) -> str:
    rows = store.conn.execute(
        "SELECT heading, count(*) AS n, min(ord) FROM chunks WHERE doc_id=? AND heading != ''"
        " GROUP BY heading ORDER BY n DESC, min(ord) LIMIT 50", (doc_id,)).fetchall()
    for heading, _, _ in rows:
        leaf = leaf_topic(heading)
        if leaf:
            return leaf
    return ""


def leaf_topic(heading: str) -> str:
    """The last part of a heading path, without its numbering; '' when it names nothing."""
    leaf = _NUMBERING.sub("", heading.split(" > ")[-1]).strip(" .:")
    words = leaf.split()
    if not 1 <= len(words) <= 8 or leaf.lower() in GENERIC or not any(c.isalpha() for c in leaf):
        return ""
    return leaf if leaf.endswith("?") else _soften(leaf)


def short_title(title: str) -> str:
    """'P-200 Centrifugal Process Pump — Operation and Maintenance Manual' -> 'P-200
    Centrifugal Process Pump'; shouting words ('BELT CONVEYOR') in title case."""
    name = _TITLE_SPLIT.split(title, maxsplit=1)[0].strip()
    return " ".join(w.capitalize() if w.isalpha() and w.isupper() and len(w) > 3 else w
                    for w in name.split())


def _soften(topic: str) -> str:
    """A heading as the middle of a sentence: 'Overpressure trip' -> 'overpressure trip',
    but acronyms and codes (PC-20, LOTO) stay as they are."""
    if topic.isupper():
        return topic.lower()
    return topic[0].lower() + topic[1:] if topic[1:2].islower() else topic


def _question(name: str, topic: str) -> str:
    if topic.endswith("?"):
        return topic  # a FAQ heading is a question already
    if topic.lower().startswith("how to "):
        return f"How do I {topic[7:]}?"
    return f"What should I know about {topic} for the {name}?"
