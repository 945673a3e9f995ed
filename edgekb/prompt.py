"""Retrieved chunks + question + earlier turns -> a prompt that fits the context window.

Two formats, chosen per model in models.toml: ``completion`` for base models such as the default
Gemma 270M (a probe showed a completion-style prompt ending in "Answer:" keeps them grounded) and
``chat`` for instruct models, rendered with the chat template from the GGUF metadata.

Order: instruction, earlier turns, sources, question. What stays between follow-ups comes first,
so the LLM's KV cache can reuse it. Everything is counted in the model's own tokens and fitted by
priority: the question always, then sources (dropped from the lowest-ranked up, the last one
kept cut), then the newest turns that fit in half the budget and in what the sources left.
Only turns on the same topic come along: a turn whose sources share no document with this
question's sources is left out (a short follow-up such as "and after that?" keeps the newest),
so a change of subject does not drag old answers into the prompt.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from .sessions import Turn
from .store import ChunkHit

INSTRUCTION = (
    "You answer a technician's question from the numbered manual excerpts below. Use only "
    "those excerpts. Answer in the language of the question, in at most four short sentences "
    "or steps, and put the number of the excerpt you used in square brackets after each fact, "
    "like [1] or [2]. If the excerpts do not contain the answer, say that the manuals do not "
    "cover it."
)
TRANSLATE_INSTRUCTION = (
    "Translate the user's question into English. Keep technical terms, option names and "
    "numbers exactly as written. Reply with the English question only."
)
# A question with at most this many content words may lean on the turn before it.
FOLLOW_UP_TERMS = 3
SOURCES_HEADER = "Sources:\n"
CHARS_PER_TOKEN = 4  # only to pick a first cut; the result is always re-counted

ChatTemplate = Callable[[list[dict[str, str]]], str]


@dataclass(frozen=True)
class Prompt:
    text: str
    sources_used: int
    turns_used: int
    stop: tuple[str, ...]
    sampling: Mapping[str, Any] = field(default_factory=dict)  # GenerationRequest fields


def cite_where(hit: ChunkHit) -> str:
    """'Troubleshooting > Overpressure trip' or 'p. 12' or ''."""
    parts = [hit.heading] if hit.heading else []
    if hit.page is not None:
        parts.append(f"p. {hit.page}")
    return ", ".join(parts)


def on_topic(question: str, turns: Sequence[Turn], hits: Sequence[ChunkHit]) -> list[Turn]:
    """The turns whose sources share a document with this question's sources; a short
    follow-up keeps at least the newest turn, whatever it cited."""
    docs = {PurePath(h.doc_path).name for h in hits}
    kept = [t for t in turns if docs & {str(s.get("doc", "")) for s in t.sources}]
    short = len(re.findall(r"\w{3,}", question)) <= FOLLOW_UP_TERMS
    if short and turns and (not kept or kept[-1] is not turns[-1]):
        kept.append(turns[-1])
    return kept


def _source_block(number: int, hit: ChunkHit) -> str:
    where = cite_where(hit)
    return f"[{number}] {hit.title}" + (f" ({where})" if where else "") + f"\n{hit.text}"


class PromptBuilder:
    def __init__(self, fmt: str, count_tokens: Callable[[str], int], budget_tokens: int,
                 stop: Sequence[str], chat_template: ChatTemplate | None = None,
                 sampling: Mapping[str, Any] | None = None) -> None:
        self.fmt = fmt
        self.count_tokens = count_tokens
        self.budget = budget_tokens
        self.stop = tuple(stop)
        self.chat_template = chat_template
        self.sampling = dict(sampling or {})

    def build(self, question: str, hits: Sequence[ChunkHit],
              history: Sequence[Turn] = ()) -> Prompt:
        blocks = self._fit_sources(question, [_source_block(i + 1, h) for i, h in enumerate(hits)])
        turns = on_topic(question, self.history_turns(history), hits[: len(blocks)])
        while turns and self.count_tokens(self._render(question, blocks, turns)) > self.budget:
            turns = turns[1:]  # sources rank above the oldest turns
        return Prompt(self._render(question, blocks, turns), len(blocks), len(turns), self.stop,
                      self.sampling)

    def translation(self, question: str) -> Prompt | None:
        """A prompt that has an instruct model put the question into English (for retrieval
        over English manuals); None for a completion model, which cannot be told to."""
        if self.fmt != "chat" or self.chat_template is None:
            return None
        text = self.chat_template([
            {"role": "system", "content": TRANSLATE_INSTRUCTION},
            {"role": "user", "content": question}])
        return Prompt(text, 0, 0, (*self.stop, "\n"), self.sampling)

    def history_turns(self, history: Sequence[Turn]) -> list[Turn]:
        """The newest turns that fit in half the budget (the other half is for sources).

        The same rule picks the turns of a follow-up and of its pre-read head (``head``), so
        the two agree and the pre-read KV cache is used."""
        turns: list[Turn] = []
        for turn in reversed(history):
            if self.count_tokens(self._render_turns([turn, *turns])) > self.budget // 2:
                break
            turns.insert(0, turn)
        return turns

    def head(self, history: Sequence[Turn]) -> str:
        """What the next prompt of this conversation starts with: everything before its
        sources. Reading it while the LLM is idle makes a follow-up's first token come sooner."""
        text = self._render("?", [], self.history_turns(history))
        return text[: text.rindex(SOURCES_HEADER)]

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

    def _render_turns(self, turns: Sequence[Turn]) -> str:
        return "".join(f"Question: {t.question}\nAnswer: {t.answer.strip()}\n\n" for t in turns)

    def _render(self, question: str, blocks: list[str], turns: Sequence[Turn]) -> str:
        sources = SOURCES_HEADER + ("\n\n".join(blocks) if blocks else "(no sources found)")
        if self.fmt == "chat" and self.chat_template is not None:
            messages = [{"role": "system", "content": INSTRUCTION}]
            for turn in turns:
                messages += [{"role": "user", "content": turn.question},
                             {"role": "assistant", "content": turn.answer}]
            messages.append({"role": "user", "content": f"{sources}\n\nQuestion: {question}"})
            return self.chat_template(messages)
        earlier = self._render_turns(turns)
        if earlier:
            earlier = f"Earlier in this conversation:\n{earlier}"
        return f"{INSTRUCTION}\n\n{earlier}{sources}\n\nQuestion: {question}\nAnswer:"
