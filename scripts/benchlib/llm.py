"""The LLM path: edgekb's streamed answers against llama-cpp-python alone, same prompt, same run.

The raw side is `Llama(...)` built with the server's model, n_ctx, n_threads, n_batch and seed,
driven by a plain `generate` loop (the design measured the streaming API within 2 % of it, so
this is the stricter baseline). Prompts are built exactly as the server builds them: edgekb's own
AnswerEngine (retrieval, source merging, prompt builder) runs in-process over the same data dir
with a stand-in LLM that records the prompt it is handed and generates nothing.
The server reuses the longest KV prefix of its previous prompt; the raw side is given the same
cached prefix (untimed) so both read the same number of prompt tokens.
"""

from __future__ import annotations

import codecs
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import llama_cpp

from edgekb.answer import AnswerEnd, AnswerEngine, AnswerOptions
from edgekb.catalog import verify
from edgekb.config import Settings
from edgekb.engines import ChatTemplate, chat_template, load_embedder, open_catalog, prompt_builder
from edgekb.index import Library
from edgekb.llm import Finished, GenerationRequest, StopScanner
from edgekb.retrieval import Searcher
from edgekb.store import AsyncStore, Store

from .common import median

# Demo questions with their answers in different sections, so consecutive prompts share only
# the instruction (tests/data/demo_questions.md).
QUESTIONS = (
    "How do I reset the pump after an overpressure trip?",
    "The compressor shuts down on high discharge temperature, what should I check?",
    "How do I verify zero energy before working on a machine?",
    "How much sag should the conveyor return belt have?",
    "What torque for the P-200 impeller nut?",
    "Why is there oil in the compressed air lines?",
)
# Conversations for the follow-up benchmark, and a question of another session asked before
# each conversation's third question.
FOLLOW_UPS = (
    ("How do I reset the pump after an overpressure trip?",
     "What pressure does it trip at?",
     "And what should I check before restarting it?"),
    ("The compressor shuts down on high discharge temperature, what should I check?",
     "What is the default value of unload.pressure.bar?",
     "How often should its oil be changed?"),
    ("How much sag should the conveyor return belt have?",
     "The belt runs off to one side, how do I adjust the tracking?",
     "Which of these checks can be done while it runs?"),
)
SAMPLING = ("top_k", "top_p", "min_p", "repeat_penalty", "presence_penalty",
            "frequency_penalty")
INTERLEAVED = "Can a supervisor remove a lock if the owner went home?"


@dataclass(frozen=True)
class BuiltPrompt:
    question: str
    text: str
    tokens: list[int]
    stop: tuple[str, ...]
    retrieval_ms: float
    sampling: dict[str, float]  # the request's sampling beyond temperature (per model)


@dataclass(frozen=True)
class RawRun:
    ttft_ms: float          # from the generate call to the first visible text, cached prefix
                            # excluded (the server, too, starts an answer at visible text)
    tokens: int             # generated tokens, end-of-generation excluded (as the server counts)
    decode_s: float         # from the first token to the end of the loop
    text: str

    @property
    def tokens_per_s(self) -> float | None:
        return (self.tokens - 1) / self.decode_s if self.tokens > 1 and self.decode_s > 0 \
            else None


class RawLlm:
    """llama-cpp-python alone, loaded with the server's settings."""

    def __init__(self, settings: Settings) -> None:
        self.entry = open_catalog(settings).get(settings.models.llm, kind="llm")
        path = verify(settings.models_cache, self.entry)["model"]
        gen = settings.generation
        self.n_ctx = int(self.entry.settings.get("n_ctx", 2048))
        self.max_tokens = gen.max_tokens
        self.llama = llama_cpp.Llama(model_path=str(path), n_ctx=self.n_ctx, n_batch=gen.n_batch,
                                     n_threads=gen.threads or os.cpu_count() or 1,
                                     seed=gen.seed, verbose=False)

    def close(self) -> None:
        self.llama.close()

    def chat_template(self) -> ChatTemplate | None:
        """The GGUF's chat template as the server renders it (None: a completion model)."""
        if self.entry.settings.get("prompt_format") != "chat":
            return None

        def piece(token: int) -> str:
            return self.llama.detokenize([token], special=True).decode(errors="ignore")

        return chat_template(self.llama.metadata.get("tokenizer.chat_template"),
                             piece(self.llama.token_eos()), piece(self.llama.token_bos()))

    # What edgekb's prompt builder needs of an LLM (engines.prompt_builder).
    def count_tokens(self, text: str) -> int:
        return len(self.llama.tokenize(text.encode(), add_bos=False, special=True))

    def prompt_tokens(self, prompt: str) -> list[int]:
        return self.llama.tokenize(prompt.encode(), add_bos=True, special=True)

    def token_pieces(self, text: str) -> list[str]:
        """The text as the model's tokens would stream it, one string per token."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return [decoder.decode(self.llama.detokenize([t], special=False))
                for t in self.llama.tokenize(text.encode(), add_bos=False, special=False)]

    def warm_up(self, prompt: BuiltPrompt) -> None:
        """Read one prompt untimed: llama.cpp allocates its compute buffers on the first one."""
        self.llama.reset()
        self.llama.eval(prompt.tokens)

    def run(self, prompt: BuiltPrompt, cached: int) -> RawRun:
        """Greedy generation of the prompt, ``cached`` prompt tokens already in the KV cache."""
        llama = self.llama
        llama.reset()
        if cached:
            llama.eval(prompt.tokens[:cached])  # what the server had cached: not timed
        vocab = llama._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        scanner = StopScanner(prompt.stop)  # the server's stop rules (lists go on)
        text, count = "", 0
        first_at: float | None = None
        started = time.perf_counter()
        sampling = prompt.sampling
        for token in llama.generate(prompt.tokens, temp=0.0, top_k=int(sampling["top_k"]),
                                    top_p=sampling["top_p"], min_p=sampling["min_p"],
                                    repeat_penalty=sampling["repeat_penalty"],
                                    presence_penalty=sampling["presence_penalty"],
                                    frequency_penalty=sampling["frequency_penalty"]):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            count += 1
            out, stopped = scanner.feed(decoder.decode(llama.detokenize([token], special=False)))
            text += out
            if first_at is None and text.strip():
                first_at = time.perf_counter()
            if stopped or count >= self.max_tokens:
                break
        ended = time.perf_counter()
        if first_at is None:
            first_at = ended
        return RawRun((first_at - started) * 1000, count, ended - first_at, text)


class PromptCapture:
    """Stands in for the LLM inside edgekb's AnswerEngine: keeps the request, generates nothing."""

    def __init__(self, n_ctx: int) -> None:
        self.n_ctx = n_ctx
        self.last: GenerationRequest | None = None

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Finished]:
        self.last = request
        yield Finished("stop", 0, 0, 0, 0.0, 0.0)


async def build_prompts(settings: Settings, raw: RawLlm, questions: tuple[str, ...]
                        ) -> list[BuiltPrompt]:
    """Each question's prompt as the server builds it for a new session (no history), and the
    retrieval time AnswerEngine reports in-process (median of 3, after one warm-up)."""
    embedder = load_embedder(settings, open_catalog(settings))
    library = Library(embedder.dim, settings.data_dir)
    loader = Store(settings.db_path)
    try:
        library.load(loader)
    finally:
        loader.close()
    store = AsyncStore(settings.db_path)
    capture = PromptCapture(raw.n_ctx)
    engine = AnswerEngine(store, Searcher(embedder, library),
                          prompt_builder(settings, raw, raw.entry,  # type: ignore[arg-type]
                                         raw.chat_template()),
                          capture)  # type: ignore[arg-type]
    options = AnswerOptions.from_settings(settings)

    async def retrieval_ms(question: str) -> float:
        end: Any = None
        async for item in engine.answer(question, options, threading.Event()):
            end = item
        assert isinstance(end, AnswerEnd)
        return float(end.timings["retrieval_ms"])

    try:
        await retrieval_ms(questions[0])
        prompts = []
        for question in questions:
            times = [await retrieval_ms(question) for _ in range(3)]
            request = capture.last
            assert request is not None
            sampling = {key: getattr(request, key) for key in SAMPLING}
            prompts.append(BuiltPrompt(question, request.prompt, raw.prompt_tokens(request.prompt),
                                       request.stop, median(times), sampling))
        return prompts
    finally:
        engine.close()
        store.close()


def same_text(a: str, b: str) -> bool:
    # The server drops a held-back partial stop string at the end; whitespace is all it can be.
    return a.strip() == b.strip()


def summarize_pair(prompt: BuiltPrompt, served: dict[str, Any], text: str, raw: RawRun,
                   client_tps: float | None, ttft_ms: float) -> dict[str, Any]:
    """``served``: the server's done event; ``text``: the answer its deltas made."""
    usage, timings = served["usage"], served["timings"]
    return {
        "question": prompt.question,
        "prompt_tokens": len(prompt.tokens),
        "server_prompt_tokens": usage.get("prompt_tokens"),
        "cached_prompt_tokens": usage.get("cached_prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "raw_tokens": raw.tokens,
        "same_prompt": usage.get("prompt_tokens") == len(prompt.tokens),
        "same_text": same_text(text, raw.text),
        "server_client_tokens_per_s": client_tps,
        "server_worker_tokens_per_s": timings.get("tokens_per_s"),
        "raw_tokens_per_s": raw.tokens_per_s,
        "server_ttft_ms": round(ttft_ms, 1),
        "server_retrieval_ms": timings.get("retrieval_ms"),
        "server_prompt_ms": timings.get("prompt_ms"),
        "raw_retrieval_ms": round(prompt.retrieval_ms, 1),
        "raw_ttft_ms": round(raw.ttft_ms, 1),
        # The first definition: a difference of two prompt reads of 1.5-4.5 s each,
        # measured seconds apart, so machine noise of a few percent moves it by +-300 ms.
        "ttft_overhead_vs_raw_ms": round(ttft_ms - prompt.retrieval_ms - raw.ttft_ms, 1),
        # What the server adds around retrieval and the prompt read (prompt building,
        # tokenizing, queue, first token, hand-off, event log, WebSocket), and the prompt
        # read itself against raw's (raw's time includes its first token: a few ms).
        "ttft_overhead_ms": round(ttft_ms - timings["retrieval_ms"] - timings["prompt_ms"], 1),
        "prompt_read_ratio": round(raw.ttft_ms / timings["prompt_ms"], 3)
        if timings.get("prompt_ms") else None,
        # Where the server's part of it goes: answer start -> first visible text on the loop,
        # beyond retrieval and the worker's prompt reading (prompt build, tokenizing, hand-off),
        # then from there to the client (the event log's SQLite commit, the WebSocket).
        "inside_ttft_ms": timings.get("ttft_ms"),
        "pipeline_ms": round(timings["ttft_ms"] - timings["retrieval_ms"] - timings["prompt_ms"], 1)
        if timings.get("ttft_ms") is not None else None,
        "delivery_ms": round(ttft_ms - timings["ttft_ms"], 1)
        if timings.get("ttft_ms") is not None else None,
    }
