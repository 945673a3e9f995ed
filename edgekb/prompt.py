"""Retrieved chunks + question -> a prompt that fits the model's context window.

Two formats, chosen per model in models.toml: ``completion`` for base models such as the default
Gemma 270M (a probe showed a completion-style prompt ending in "Answer:" keeps them grounded) and
``chat`` for instruct models, rendered with the chat template from the GGUF metadata.
Everything is counted in the model's own tokens; sources are dropped from the lowest-ranked up
(and the last one kept is cut) until the prompt fits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .store import ChunkHit

INSTRUCTION = (
    "Answer the question using only the numbered sources below. Be brief and precise, keep the "
    "steps in order, and cite the sources you use as [1], [2]. If the sources do not contain the "
    "answer, say that the manuals do not cover it."
)


@dataclass(frozen=True)
class Prompt:
    text: str
    sources_used: int
    stop: tuple[str, ...]


def cite_where(hit: ChunkHit) -> str:
    """'Troubleshooting > Overpressure trip' or 'p. 12' or ''."""
    parts = [hit.heading] if hit.heading else []
    if hit.page is not None:
        parts.append(f"p. {hit.page}")
    return ", ".join(parts)


def _source_block(number: int, hit: ChunkHit, text: str) -> str:
    where = cite_where(hit)
    head = f"[{number}] {hit.title}" + (f" ({where})" if where else "")
    return f"{head}\n{text}"


class PromptBuilder:
    def __init__(self, fmt: str, count_tokens: Callable[[str], int], budget_tokens: int,
                 stop: Sequence[str], chat_template: Callable[[list[dict[str, str]]], str] | None
                 = None) -> None:
        self.fmt = fmt
        self.count_tokens = count_tokens
        self.budget = budget_tokens
        self.stop = tuple(stop)
        self.chat_template = chat_template

    def build(self, question: str, hits: Sequence[ChunkHit]) -> Prompt:
        blocks = [_source_block(i + 1, h, h.text) for i, h in enumerate(hits)]
        while True:
            text = self._render(question, blocks)
            if not blocks or self.count_tokens(text) <= self.budget:
                return Prompt(text, len(blocks), self.stop)
            overflow = self.count_tokens(text) - self.budget
            last = blocks[-1]
            if len(blocks) > 1 and self.count_tokens(last) <= overflow + 20:
                blocks.pop()
            else:  # cut the last source; roughly 3 characters per token
                keep = max(0, len(last) - (overflow + 10) * 4)
                blocks[-1] = last[:keep] if keep > 80 else ""
                blocks = [b for b in blocks if b]

    def _render(self, question: str, blocks: list[str]) -> str:
        sources = "\n\n".join(blocks) if blocks else "(no sources found)"
        if self.fmt == "chat" and self.chat_template is not None:
            return self.chat_template([
                {"role": "system", "content": INSTRUCTION},
                {"role": "user", "content": f"Sources:\n{sources}\n\nQuestion: {question}"},
            ])
        return f"{INSTRUCTION}\n\nSources:\n{sources}\n\nQuestion: {question}\nAnswer:"
