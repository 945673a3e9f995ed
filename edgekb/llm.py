"""The local LLM engine: several answers decoded together by one worker thread.

The event loop talks to the worker (decoder.py) through ``stream()``: it hands over a job and
reads the job's events from a queue that the worker fills, coalesced, at most once per flush
interval. ``generation.slots`` answers run at once (the fair queue hands out that many turns);
each keeps its own KV sequence, so up to that many sessions keep their prompt prefix resident,
and KV snapshots of recent sessions (StateCache) bring others back.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from .decoder import Decoder, Job, Outbox, StepGate
from .errors import ModelError
from .llamacpp import Context, ContextShape, Model, Sampling
from .llm_types import Finished, LlmEvent, Piece, Reading, StopScanner

__all__ = ["Finished", "GenerationRequest", "LlmEngine", "LlmEvent", "Piece", "Reading",
           "SavedState", "StateCache", "StopScanner"]

# Prompts are read in chunks that start at multiples of this many tokens, and cached prefixes
# are reused only up to such a boundary: then a prompt's KV, and so a greedy answer, is the
# same whatever was cached before (README, "Reproducible answers").
REUSE_BLOCK = 16


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_tokens: int
    temperature: float
    stop: tuple[str, ...]
    cancel: threading.Event = field(default_factory=threading.Event, compare=False)
    cache_key: str | None = None   # whose KV state to keep for a follow-up (a session)
    # Sampling beyond temperature, per model (models.toml; llama_cpp.Llama's defaults):
    # small models loop without repetition control.
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True)
class SavedState:
    tokens: tuple[int, ...]
    data: bytes


class StateCache:
    """KV-cache snapshots of recent sessions, least recently used dropped first, bounded in
    bytes, so interleaved users each keep the prefix of their own conversation. Used by the
    worker thread only."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._states: OrderedDict[str, SavedState] = OrderedDict()
        self.size = 0

    def get(self, key: str) -> SavedState | None:
        state = self._states.get(key)
        if state is not None:
            self._states.move_to_end(key)
        return state

    def put(self, key: str, state: SavedState) -> None:
        old = self._states.pop(key, None)
        if old is not None:
            self.size -= len(old.data)
        if len(state.data) > self.max_bytes:
            return
        self._states[key] = state
        self.size += len(state.data)
        while self.size > self.max_bytes:
            _, dropped = self._states.popitem(last=False)
            self.size -= len(dropped.data)


class LlmEngine:
    def __init__(self, model_path: Path, *, n_ctx: int, threads: int, n_batch: int,
                 seed: int, state_cache_bytes: int = 0, slots: int = 1,
                 flush_interval_s: float = 0.05, use_mmap: bool = True,
                 use_mlock: bool = False) -> None:
        self.n_ctx = n_ctx
        self.slots = slots
        self.seed = seed
        self.model = Model(model_path, use_mmap=use_mmap, use_mlock=use_mlock)
        try:
            self.context = Context(self.model, ContextShape(
                n_ctx_seq=n_ctx, n_seq=slots, n_batch=n_batch,
                threads=threads or _cores()))
        except ModelError:
            self.model.close()
            raise
        self.states = StateCache(state_cache_bytes)
        self.decoder = Decoder(self.model, self.context, block=REUSE_BLOCK,
                               flush_interval_s=flush_interval_s,
                               save_state=self._save_state, load_state=self._load_state)

    def set_step_gate(self, gate: StepGate) -> None:
        """Every llama_decode call runs inside ``gate()`` (cpugate.CpuGate.decode_step)."""
        self.decoder.step_gate = gate

    def close(self) -> None:
        self.decoder.close()
        self.context.close()
        self.model.close()

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenize(text, add_bos=False))

    def metadata(self, key: str) -> str | None:
        return self.model.metadata(key)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[LlmEvent]:
        """Generate on the worker; yields Reading..., Piece..., then one Finished.

        The queue is bounded by construction: the worker sends at most one batch of events
        per flush interval, and a request has at most max_tokens pieces.
        """
        loop = asyncio.get_running_loop()
        tokens = await loop.run_in_executor(None, self._prompt_tokens, request)
        queue: asyncio.Queue[LlmEvent | BaseException] = asyncio.Queue()

        def deliver(events: list[LlmEvent | BaseException]) -> None:
            for event in events:
                queue.put_nowait(event)

        sampling = Sampling(temperature=request.temperature, top_k=request.top_k,
                            top_p=request.top_p, min_p=request.min_p,
                            repeat_penalty=request.repeat_penalty,
                            presence_penalty=request.presence_penalty,
                            frequency_penalty=request.frequency_penalty, seed=self.seed)
        self.decoder.submit(Job(tokens, request.cache_key, request.cancel,
                                Outbox(loop, deliver), request.max_tokens, sampling,
                                request.stop))
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    break
        finally:
            request.cancel.set()  # a consumer that left stops its answer within one token
            self.decoder.wake()

    def _prompt_tokens(self, request: GenerationRequest) -> list[int]:
        tokens = self.model.tokenize(request.prompt, add_bos=True)
        if len(tokens) + request.max_tokens > self.n_ctx:
            raise ModelError(f"prompt of {len(tokens)} tokens plus {request.max_tokens} to "
                             f"generate exceeds the context of {self.n_ctx}")
        return tokens

    async def prefill(self, text: str, cache_key: str, cancel: threading.Event) -> int:
        """Read ``text`` into the KV cache while the LLM is idle and keep the state for
        ``cache_key``; stops between steps once ``cancel`` is set. Returns tokens read."""
        if not self.states.max_bytes:
            return 0  # without snapshots the next question of any session would undo it
        return await self._preread(text, cache_key, cancel)

    async def warm(self, text: str, cancel: threading.Event) -> int:
        """Read ``text`` (the head every prompt starts with) once and copy its KV to every
        empty slot: after a start, each slot's first question reads only what follows it."""
        return await self._preread(text, None, cancel, share=True)

    async def _preread(self, text: str, cache_key: str | None, cancel: threading.Event,
                       share: bool = False) -> int:
        loop = asyncio.get_running_loop()
        tokens = await loop.run_in_executor(
            None, lambda: self.model.tokenize(text, add_bos=True))
        if cancel.is_set() or len(tokens) >= self.n_ctx:
            return 0
        done: asyncio.Future[int] = loop.create_future()

        def finished(read: int) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(read))

        self.decoder.submit(Job(tokens, cache_key, cancel, None, on_done=finished, share=share))
        try:
            return await done
        finally:
            if not done.done():  # our caller gave up: stop reading at the next step
                cancel.set()
                self.decoder.wake()

    # Called by the worker thread.
    def _save_state(self, key: str, tokens: tuple[int, ...], data: bytes) -> None:
        if self.states.max_bytes:
            self.states.put(key, SavedState(tokens, data))

    def _load_state(self, key: str) -> tuple[tuple[int, ...], bytes] | None:
        state = self.states.get(key)
        return (state.tokens, state.data) if state is not None else None


def _cores() -> int:
    return os.cpu_count() or 1
