"""The LLM engine: one worker thread owns the llama context.

llama-cpp-python cannot run two completions on one context, so every generation runs on a single
worker thread. The event loop talks to it through ``stream()``: the worker pushes events with
``call_soon_threadsafe`` and the loop consumes them. The prompt is evaluated in ``n_batch`` steps so
that reading progress can be reported, and the KV cache keeps the longest shared prefix with the
previous prompt, so a follow-up that repeats the same head is not read again.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp

from .errors import ModelError


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_tokens: int
    temperature: float
    stop: tuple[str, ...]
    cancel: threading.Event = field(default_factory=threading.Event, compare=False)
    cache_key: str | None = None   # whose KV state to keep for a follow-up (a session)
    # Sampling, per model (models.toml): small models loop without repetition control.
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05


@dataclass(frozen=True)
class Reading:
    """Prompt evaluation progress."""

    done: int
    total: int


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    finish: str             # stop | length | cancelled
    prompt_tokens: int
    cached_tokens: int      # prompt tokens reused from the KV cache
    completion_tokens: int
    prompt_ms: float
    generation_ms: float


LlmEvent = Reading | Piece | Finished


class StopScanner:
    """Finds stop strings in streamed text, holding back what might be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.emitted = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was reached)."""
        self.text += piece
        for stop in self.stops:
            at = self.text.find(stop, max(0, self.emitted - len(stop)))
            if at != -1:
                out = self.text[self.emitted : at]
                self.emitted = at
                return out, True
        hold = max((k for s in self.stops for k in range(1, len(s))
                    if self.text.endswith(s[:k])), default=0)
        end = max(self.emitted, len(self.text) - hold)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out, False

    def flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


@dataclass(frozen=True)
class SavedState:
    tokens: tuple[int, ...]
    data: bytes


def common_prefix(a: list[int] | tuple[int, ...], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class StateCache:
    """KV-cache snapshots of recent sessions, least recently used dropped first, bounded in
    bytes, so interleaved users each keep the prefix of their own conversation."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._states: OrderedDict[str, SavedState] = OrderedDict()

    @property
    def size(self) -> int:
        return sum(len(s.data) for s in self._states.values())

    def get(self, key: str) -> SavedState | None:
        state = self._states.get(key)
        if state is not None:
            self._states.move_to_end(key)
        return state

    def put(self, key: str, state: SavedState) -> None:
        self._states.pop(key, None)
        if len(state.data) > self.max_bytes:
            return
        self._states[key] = state
        while self.size > self.max_bytes:
            self._states.popitem(last=False)


class LlmEngine:
    def __init__(self, model_path: Path, *, n_ctx: int, threads: int, n_batch: int,
                 seed: int, state_cache_bytes: int = 0) -> None:
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        try:
            self.llama = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_batch,
                               n_threads=threads or os.cpu_count() or 1, seed=seed,
                               verbose=False)
        except ValueError as exc:
            raise ModelError(f"cannot load the LLM {model_path}: {exc}") from exc
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="llm")
        self.states = StateCache(state_cache_bytes)

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        self.llama.close()

    def count_tokens(self, text: str) -> int:
        return len(self.llama.tokenize(text.encode(), add_bos=False, special=True))

    def metadata(self, key: str) -> str | None:
        return self.llama.metadata.get(key)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[LlmEvent]:
        """Run one generation on the worker; yields Reading, Piece..., then one Finished.

        The queue is bounded by construction: at most n_ctx/n_batch Reading events and
        max_tokens Pieces per request.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[LlmEvent | BaseException] = asyncio.Queue()

        def emit(item: LlmEvent | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        future = loop.run_in_executor(self._worker, self._generate, request, emit)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    break
        finally:
            request.cancel.set()  # a consumer that left stops the worker within one token
            await asyncio.shield(future)

    def _generate(self, request: GenerationRequest, emit: Callable[[object], None]) -> None:
        try:
            emit(self._run(request, emit))
        except BaseException as exc:  # handed to the loop, raised there
            emit(exc)

    def _run(self, request: GenerationRequest, emit: Callable[[object], None]) -> Finished:
        llama = self.llama
        started = time.perf_counter()
        tokens = llama.tokenize(request.prompt.encode(), add_bos=True, special=True)
        if len(tokens) + request.max_tokens > self.n_ctx:
            raise ModelError(f"prompt of {len(tokens)} tokens plus {request.max_tokens} to "
                             f"generate exceeds the context of {self.n_ctx}")
        cached = self._read_prompt(tokens[:-1], request.cache_key, request.cancel, emit)
        if request.cancel.is_set():
            return Finished("cancelled", len(tokens), cached, 0,
                            (time.perf_counter() - started) * 1000, 0.0)
        prompt_done = time.perf_counter()
        scanner = StopScanner(request.stop)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = llama._model.vocab
        finish, generated = "length", 0
        for token in llama.generate(tokens, temp=request.temperature, top_k=request.top_k,
                                    top_p=request.top_p, min_p=request.min_p,
                                    repeat_penalty=request.repeat_penalty,
                                    presence_penalty=request.presence_penalty,
                                    frequency_penalty=request.frequency_penalty):
            if request.cancel.is_set():
                finish = "cancelled"
                break
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            generated += 1
            text, stopped = scanner.feed(decoder.decode(llama.detokenize([token], special=False)))
            if text:
                emit(Piece(text))
            if stopped:
                finish = "stop"
                break
            if generated >= request.max_tokens:
                break
        if finish != "stop":
            tail = scanner.flush() if finish == "length" else ""
            if tail:
                emit(Piece(tail))
        end = time.perf_counter()
        if request.cache_key and self.states.max_bytes:
            self.states.put(request.cache_key, self._save_state())
        return Finished(finish, len(tokens), cached, generated,
                        (prompt_done - started) * 1000, (end - prompt_done) * 1000)

    def _save_state(self) -> SavedState:
        # Llama.save_state also copies the logits of every batch row (n_batch x n_vocab floats:
        # 134 MB for Gemma's 262k vocabulary); the KV cache is all a prefix needs.
        ctx = self.llama._ctx.ctx
        size = llama_cpp.llama_state_get_size(ctx)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_get_data(ctx, buffer, size)
        n = self.llama.n_tokens
        # string_at copies in C; slicing the ctypes array would build a list of ints under the
        # GIL (a 275 ms stall of the event loop for an 11 MB state).
        return SavedState(tuple(self.llama.input_ids[:n].tolist()),
                          ctypes.string_at(buffer, written))

    def _load_state(self, state: SavedState) -> None:
        data = (ctypes.c_uint8 * len(state.data)).from_buffer_copy(state.data)
        if llama_cpp.llama_state_set_data(self.llama._ctx.ctx, data, len(state.data)) != len(
                state.data):
            raise ModelError("could not restore a saved KV state")
        n = len(state.tokens)
        self.llama.input_ids[:n] = state.tokens
        self.llama.n_tokens = n

    def _read_prompt(self, tokens: list[int], cache_key: str | None, cancel: threading.Event,
                     emit: Callable[[object], None]) -> int:
        """Evaluate ``tokens`` in n_batch steps, reusing the longest cached prefix: the live
        context's, or the session's saved snapshot when that one matches more.

        Generation passes all but the last prompt token: ``generate`` then finds this prefix
        in the cache and evaluates only the last one. Returns how many were already cached.
        """
        llama = self.llama
        cached = common_prefix(llama._input_ids.tolist(), tokens)
        saved = self.states.get(cache_key) if cache_key else None
        if saved is not None and common_prefix(saved.tokens, tokens) > cached:
            self._load_state(saved)  # another session ran in between: bring ours back
            cached = common_prefix(saved.tokens, tokens)
        llama.n_tokens = cached
        target = len(tokens)
        emit(Reading(cached, target))
        for start in range(cached, target, self.n_batch):
            if cancel.is_set():
                break
            llama.eval(tokens[start : min(target, start + self.n_batch)])
            emit(Reading(llama.n_tokens, target))
        return cached

    async def prefill(self, text: str, cache_key: str, cancel: threading.Event) -> int:
        """Read ``text`` into the KV cache while the LLM is idle and keep the state for
        ``cache_key``; stops between steps once ``cancel`` is set. Returns tokens read."""
        if not self.states.max_bytes:
            return 0  # without snapshots the next question of any session would undo it
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, self._prefill, text, cache_key, cancel)

    def _prefill(self, text: str, cache_key: str, cancel: threading.Event) -> int:
        tokens = self.llama.tokenize(text.encode(), add_bos=True, special=True)
        if cancel.is_set() or len(tokens) >= self.n_ctx:
            return 0
        cached = self._read_prompt(tokens, cache_key, cancel, lambda _: None)
        self.states.put(cache_key, self._save_state())
        return self.llama.n_tokens - cached
