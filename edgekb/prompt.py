"""Retrieved chunks + question + earlier turns -> a prompt that fits the context window.

Two formats, chosen per model in models.toml: ``completion`` for base models such as the default
Gemma 270M (a probe showed a completion-style prompt ending in "Answer:" keeps them grounded) and
``chat`` for instruct models, rendered with the chat template from the GGUF metadata.

Order: instruction, sources, earlier turns, question, as if the sources had been handed over
with the conversation's first question. What stays between follow-ups comes first, so the
LLM's KV cache can reuse it: a follow-up whose sources start as the earlier answer's did
(carryover.py) finds the whole earlier prompt cached, its answer included when the idle
pre-read got to it (``head``). Everything is counted in the model's own tokens and fitted by
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
# One worked example before the real sources, for the chat models whose models.toml entry asks
# for it (`worked_example`): Qwen 0.5B shown how an answer looks copies no excerpt headers and
# no longer says that excerpts holding the answer do not; SmolLM2 135M got worse with it
# (scripts/eval_answers). Constant, so it stays in every slot's KV cache.
# A label printer: far from the demo manuals (a pump, a compressor, a conveyor), so its facts
# cannot be mistaken for theirs.
EXAMPLE_SOURCES = (
    "[1] Label printer LP-4 (Maintenance > Print head)\nClean the print head with an alcohol "
    "swab after every 5 label rolls. Replace the head after 50 km of labels, or at once when "
    "it leaves white lines.\n\n"
    "[2] Label printer LP-4 (Specifications)\nPrint width 104 mm. Resolution 300 dpi.")
EXAMPLE_QUESTION = "How often do I replace the print head?"
EXAMPLE_ANSWER = ("Replace the print head after 50 km of labels, or at once if it leaves "
                  "white lines [1]. Clean it with an alcohol swab after every 5 rolls in "
                  "between [1].")
TRANSLATE_INSTRUCTION = (
    "Translate the user's question into English. Keep technical terms, option names and "
    "numbers exactly as written. Reply with the English question only."
)
# A question with at most this many content words may lean on the turn before it.
FOLLOW_UP_TERMS = 3
SOURCES_HEADER = "Sources:\n"
QUESTION_LABEL = "Question: "
HEAD_MARK = "\x00next question\x00"  # where head() cuts a rendered prompt
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


def is_short_follow_up(question: str) -> bool:
    """Too few words to stand alone ("and after that?"): it leans on the turn before."""
    return len(re.findall(r"\w{3,}", question)) <= FOLLOW_UP_TERMS


def on_topic(question: str, turns: Sequence[Turn], hits: Sequence[ChunkHit]) -> list[Turn]:
    """The turns whose sources share a document with this question's sources; a short
    follow-up keeps at least the newest turn, whatever it cited."""
    docs = {PurePath(h.doc_path).name for h in hits}
    kept = [t for t in turns if docs & {str(s.get("doc", "")) for s in t.sources}]
    short = is_short_follow_up(question)
    if short and turns and (not kept or kept[-1] is not turns[-1]):
        kept.append(turns[-1])
    return kept


def _source_block(number: int, hit: ChunkHit) -> str:
    where = cite_where(hit)
    return f"[{number}] {hit.title}" + (f" ({where})" if where else "") + f"\n{hit.text}"


class PromptBuilder:
    def __init__(self, fmt: str, count_tokens: Callable[[str], int], budget_tokens: int,
                 stop: Sequence[str], chat_template: ChatTemplate | None = None,
                 sampling: Mapping[str, Any] | None = None, worked_example: bool = False
                 ) -> None:
        self.fmt = fmt
        self.worked_example = worked_example  # chat models only (models.toml)
        self.count_tokens = count_tokens
        self.budget = budget_tokens
        self.stop = tuple(stop)
        self.chat_template = chat_template
        self.sampling = dict(sampling or {})

    def build(self, question: str, hits: Sequence[ChunkHit],
              history: Sequence[Turn] = (), grounded: bool = True) -> Prompt:
        """``grounded`` False: the model alone, without the instruction or any sources."""
        if not grounded:
            return self._direct(question, history)
        blocks, turns = self._fit(question, hits, history)
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

    def _direct(self, question: str, history: Sequence[Turn]) -> Prompt:
        turns = list(history)
        while True:
            if self.fmt == "chat" and self.chat_template is not None:
                messages = [m for t in turns for m in ({"role": "user", "content": t.question},
                                                       {"role": "assistant", "content": t.answer})]
                text = self.chat_template([*messages, {"role": "user", "content": question}])
            else:
                text = f"{self._render_turns(turns)}Question: {question}\nAnswer:"
            if not turns or self.count_tokens(text) <= self.budget:
                return Prompt(text, 0, len(turns), self.stop)
            turns = turns[1:]  # the oldest turns go first

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

    def head(self, history: Sequence[Turn], hits: Sequence[ChunkHit] = ()) -> str:
        """What the next prompt of this conversation starts with when its sources start with
        ``hits`` (the last answer's, see carryover.py): with them, everything before the new
        question; without, everything before the sources. Reading it while the LLM is idle
        makes a follow-up's first token come sooner."""
        if not hits:
            text = self._render("?", [], [])
            return text[: text.rindex(SOURCES_HEADER)]
        # Fitted as build() will fit them, for a question as long as the last one.
        blocks, turns = self._fit(history[-1].question if history else "?", hits, history)
        text = self._render(HEAD_MARK, blocks, turns)
        return text[: text.rindex(f"{QUESTION_LABEL}{HEAD_MARK}")]

    def _fit(self, question: str, hits: Sequence[ChunkHit], history: Sequence[Turn]
             ) -> tuple[list[str], list[Turn]]:
        """The source blocks and the turns that fit in the budget, by priority."""
        blocks = self._fit_sources(question, [_source_block(i + 1, h) for i, h in enumerate(hits)])
        turns = on_topic(question, self.history_turns(history), hits[: len(blocks)])
        while turns and self.count_tokens(self._render(question, blocks, turns)) > self.budget:
            turns = turns[1:]  # sources rank above the oldest turns
        return blocks, turns

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
        return "".join(f"{QUESTION_LABEL}{t.question}\nAnswer: {t.answer.strip()}\n\n"
                       for t in turns)

    def _render(self, question: str, blocks: list[str], turns: Sequence[Turn]) -> str:
        """Sources before the first question: a follow-up's prompt then starts as the prompt
        before it did, answer included."""
        sources = SOURCES_HEADER + ("\n\n".join(blocks) if blocks else "(no sources found)")
        if self.fmt == "chat" and self.chat_template is not None:
            messages = [{"role": "system", "content": INSTRUCTION}]
            if self.worked_example:
                messages += [{"role": "user", "content": f"{SOURCES_HEADER}{EXAMPLE_SOURCES}"
                                                         f"\n\n{QUESTION_LABEL}{EXAMPLE_QUESTION}"},
                             {"role": "assistant", "content": EXAMPLE_ANSWER}]
            asked = [*((t.question, t.answer) for t in turns), (question, None)]
            for number, (asked_question, answer) in enumerate(asked):
                lead = f"{sources}\n\n" if number == 0 else ""
                messages.append({"role": "user",
                                 "content": f"{lead}{QUESTION_LABEL}{asked_question}"})
                if answer is not None:
                    messages.append({"role": "assistant", "content": answer})
            return self.chat_template(messages)
        return (f"{INSTRUCTION}\n\n{sources}\n\n{self._render_turns(turns)}"
                f"{QUESTION_LABEL}{question}\nAnswer:")
