"""Sources a technician can read: a snippet at sentence ends around the match, a relevance
band, and an entry that always fits one event frame."""

from __future__ import annotations

import json

from edgekb.retrieval import ScoredHit
from edgekb.sources import ENTRY_BYTES, not_covered_text, relevance_band, snippet, source_entry
from edgekb.store import ChunkHit

MANUAL = ("The pump has two seals. Check them every month. "
          "To reset after an overpressure trip, close the discharge valve and hold RESET for "
          "3 s. The display then shows READY. Grease the bearings every 500 hours.")


def test_snippet_is_cut_at_sentence_ends_around_the_matching_part() -> None:
    text = snippet(MANUAL, "How do I reset the pump after an overpressure trip?", limit=120)
    assert "hold RESET for 3 s." in text
    assert text.startswith("… To reset") and text.endswith("…")
    assert "Grease" not in text  # over the limit: the far sentence is left out


def test_entry_stays_under_the_frame_budget_with_long_multibyte_text() -> None:
    hit = ChunkHit(1, "default", "/docs/手册.md", "泵维护手册 " * 30, "故障 > 复位 " * 30, 12,
                   "复位按钮在控制器上。" * 400)
    entry = source_entry(1, ScoredHit(hit, 1.234, 0.91), "复位")
    assert len(json.dumps(entry, ensure_ascii=False).encode()) <= ENTRY_BYTES
    assert set(entry) == {"n", "doc", "title", "where", "page", "snippet", "relevance",
                          "score"}
    assert entry["relevance"] == "high" and entry["page"] == 12 and entry["snippet"]


def test_relevance_is_said_in_bands() -> None:
    assert [relevance_band(r) for r in (0.95, 0.7, 0.3)] == ["high", "medium", "low"]


def test_not_covered_names_the_manuals_searched_in_the_question_language() -> None:
    titles = [f"Manual {i}" for i in range(12)]
    english = not_covered_text("How often is the oil changed?", titles)
    assert english.startswith("The manuals do not cover this.")
    assert "Manual 0" in english and "and 4 more" in english
    assert not_covered_text("多久换油？", titles[:2]).startswith("手册中没有涉及")
