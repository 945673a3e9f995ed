"""An answer that opens by copying a source's header line loses that line.

The prompt numbers its sources as "[2] Title (where)" on a line of their own (prompt.py), and
small models often start their answer by writing that line again, so the technician read the
manual's title and heading where the answer should start. While the answer's first line could
still be such a header it is held back; a first line that is one ("[n] Title (where)" or
"[n] Title" of a listed source) is dropped with the blank space after it, anything else is let
through unchanged. Only the first line: a header later in an answer ends it anyway (the
"\\n[" stop, models.toml).
"""

from __future__ import annotations

from collections.abc import Sequence


class CopiedHeader:
    """Streams text through, dropping a first line that copies a source header."""

    def __init__(self, headers: Sequence[str]) -> None:
        # Each header also without its "(where)": models copy either.
        lines = set(headers) | {h.rsplit(" (", 1)[0] for h in headers if h.endswith(")")}
        self.lines = tuple(sorted(lines))
        self.held = ""
        self.state = "deciding" if self.lines else "passing"  # deciding | skipping | passing

    def feed(self, text: str) -> str:
        if self.state == "passing":
            return text
        if self.state == "skipping":
            return self._skip_space(text)
        self.held += text
        lead = self.held.lstrip()
        first, newline, rest = lead.partition("\n")
        if newline and first.rstrip() in self.lines:
            self.held = ""
            self.state = "skipping"
            return self._skip_space(rest)
        if newline or not any(line.startswith(first.rstrip()) for line in self.lines):
            return self._release()
        return ""

    def flush(self) -> str:
        """The end of the answer: what is still held (an answer that is only a header keeps
        it, rather than becoming empty)."""
        return self._release() if self.state == "deciding" else ""

    def _release(self) -> str:
        held, self.held = self.held, ""
        self.state = "passing"
        return held

    def _skip_space(self, text: str) -> str:
        kept = text.lstrip()
        if kept:
            self.state = "passing"
        return kept
