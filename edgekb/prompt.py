"""Retrieved chunks + question + earlier turns -> a prompt that fits the context window.

Two formats, chosen per model in models.toml: ``completion`` for base models such as the default
Gemma 270M (a probe showed a completion-style prompt ending in "Answer:" keeps them grounded) and
``chat`` for instruct models, rendered with the chat template from the GGUF metadata.

Order: instruction, earlier turns, sources, question. What stays between follow-ups comes first,
so the LLM's KV cache can reuse it. Everything is counted in the model's own tokens and fitted by
priority: the question always, then sources (dropped from the lowest-ranked up, the last one
kept cut), then as many of the newest turns as still fit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .sessions import Turn
from .store import ChunkHit

INSTRUCTION = (
    "Answer the question using only the numbered sources below. Be brief and precise, keep the "
    "steps in order, and cite the sources you use as [1], [2]. If the sources do not contain the "
    "answer, say that the manuals do not cover it."
)
CHARS_PER_TOKEN = 4  # only to pick a first cut; the result is always re-counted

ChatTemplate = Callable[[list[dict[str, str]]], str]


@dataclass(frozen=True)
class Prompt:
    text: str
    sources_used: int
    turns_used: int
    stop: tuple[str, ...]


def cite_where(hit: ChunkHit) -> str:
    """'Troubleshooting > Overpressure trip' or 'p. 12' or ''."""
    parts = [hit.heading] if hit.heading else []
    if hit.page is not None:
        parts.append(f"p. {hit.page}")
    return ", ".join(parts)


def _source_block(number: int, hit: ChunkHit) -> str:
    where = cite_where(hit)
    return f"[{number}] {hit.title}" + (f" ({where})" if where else "") + f"\n{hit.text}"


class PromptBuilder:
    def __init__(self, fmt: str, count_tokens: Callable[[str], int], budget_tokens: int,
                 stop: Sequence[str], chat_template: ChatTemplate | None = None) -> None:
        self.fmt = fmt
        self.count_tokens = count_tokens
        self.budget = budget_tokens
        self.stop = tuple(stop)
        self.chat_template = chat_template

    def build(self, question: str, hits: Sequence[ChunkHit],
              history: Sequence[Turn] = ()) -> Prompt:
        blocks = self._fit_sources(question, [_source_block(i + 1, h) for i, h in enumerate(hits)])
        turns: list[Turn] = []
        for turn in reversed(history):  # newest first, while they fit
            if self.count_tokens(self._render(question, blocks, [turn, *turns])) > self.budget:
                break
            turns.insert(0, turn)
        return Prompt(self._render(question, blocks, turns), len(blocks), len(turns), self.stop)

    def _fit_sources(self, question: str, blocks: list[str]) -> list[str]:
        while blocks:
            overflow = self.count_tokens(self._render(question, blocks, [])) - self.budget
            if overflow <= 0:
                break
            last = blocks[-1]
            if len(blocks) > 1 and self.count_tokens(last) <= overflow + 20:
                blocks = blocks[:-1]
                continue
            keep = len(last) - (overflow + 10) * CHARS_PER_TOKEN
            blocks = blocks[:-1] + ([last[:keep]] if keep > 80 else [])
        return blocks

    def _render(self, question: str, blocks: list[str], turns: Sequence[Turn]) -> str:
        sources = "\n\n".join(blocks) if blocks else "(no sources found)"
        if self.fmt == "chat" and self.chat_template is not None:
            messages = [{"role": "system", "content": INSTRUCTION}]
            for turn in turns:
                messages += [{"role": "user", "content": turn.question},
                             {"role": "assistant", "content": turn.answer}]
            messages.append({"role": "user",
                             "content": f"Sources:\n{sources}\n\nQuestion: {question}"})
            return self.chat_template(messages)
        earlier = "".join(f"Question: {t.question}\nAnswer: {t.answer.strip()}\n\n"
                          for t in turns)
        if earlier:
            earlier = f"Earlier in this conversation:\n{earlier}"
        return (f"{INSTRUCTION}\n\n{earlier}Sources:\n{sources}\n\n"
                f"Question: {question}\nAnswer:")
