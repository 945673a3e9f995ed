"""The LLM worker: continuous batching of several answers on one llama context.

One thread owns the context. Each answer (a *job*) gets a slot: its own KV sequence (a separate
KV stream), its own sampler chain, stop strings and cancel flag. A step decodes one token of
every answer being written, then reads one chunk of a newcomer's prompt, so an answer that
joins reads its prompt while the others keep streaming. Jobs join and leave between steps.

Reproducible greedy answers (README, "Reproducible answers"): llama.cpp's CPU kernels give a
token's row of a batch the same bits only if it goes through the same kernel, and which kernel
it gets depends on its place in the batch: the repacked quantized matmuls take rows in groups
of 4 (16 with AVX-512) and the rows left over one at a time, and their results differ in the
last bits. So:
- a prompt is read in chunks that start at absolute positions that are multiples of
  ``block``, every chunk but the last ``block``-aligned in length, never mixed with other
  rows; a cached prefix is reused only up to such a boundary (and never beyond the prompt's
  whole blocks, nor into generated tokens);
- generated tokens are decoded at most ``max_rows`` (3) per llama_decode call, so each takes
  the one-row path, exactly as when its answer runs alone;
- each sequence has its own KV stream (not a unified cache), so attention sums run over the
  same cells in the same order as alone.

Events leave the thread coalesced: at most one loop wake-up per flush interval carries the new
text of every answer; an answer's first visible text and its end go out at once.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from . import memtrim
from .llamacpp import Batch, Context, Model, Sampler, Sampling
from .llm_types import Finished, LlmEvent, Piece, Reading, StopScanner

log = logging.getLogger(__name__)

# More rows than this in one call go through the repacked matmuls' multi-row kernel
# (ggml-cpu repack.cpp: "more than three rows in src1, use gemm"), whose bits differ.
MAX_DECODE_ROWS = 3

Deliver = Callable[[list[LlmEvent | BaseException]], None]
SaveState = Callable[[str, tuple[int, ...], bytes], None]
LoadState = Callable[[str], tuple[tuple[int, ...], bytes] | None]
StepGate = Callable[[], AbstractContextManager[object]]


class Outbox:
    """One job's events waiting for the next flush: Pieces merge, only the last Reading
    stays. The worker delivers every job's events of a flush in one loop callback."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deliver: Deliver) -> None:
        self.loop = loop
        self.deliver = deliver
        self.events: list[LlmEvent | BaseException] = []
        self.urgent = False

    def put(self, event: LlmEvent | BaseException, urgent: bool = False) -> None:
        last = self.events[-1] if self.events else None
        if isinstance(event, Piece) and isinstance(last, Piece):
            self.events[-1] = Piece(last.text + event.text)
        elif isinstance(event, Reading) and isinstance(last, Reading):
            self.events[-1] = event
        else:
            self.events.append(event)
        self.urgent = self.urgent or urgent

    def take(self) -> list[LlmEvent | BaseException]:
        events, self.events, self.urgent = self.events, [], False
        return events


@dataclass(eq=False)
class Job:
    """An answer to write (``max_tokens`` > 0) or a prompt head to pre-read (0)."""

    tokens: list[int]                 # the whole prompt
    cache_key: str | None             # whose KV to keep (a session)
    cancel: threading.Event
    outbox: Outbox | None = None      # answers: where their events go
    max_tokens: int = 0
    sampling: Sampling | None = None
    stop: tuple[str, ...] = ()
    on_done: Callable[[int], None] | None = None  # pre-reading: called with tokens read
    share: bool = False               # pre-reading: copy the KV read to every empty slot
    # Worker-side state.
    seq: int = -1
    read: int = 0                     # prompt tokens in the KV cache
    cached: int = 0                   # of which were reused
    next_token: int = -1              # sampled, to be decoded in the next step
    generated: int = 0
    visible: bool = False             # some non-blank text went out
    started: float = 0.0
    prompt_done: float = 0.0
    sampler: Sampler | None = None
    scanner: StopScanner | None = None
    utf8: codecs.IncrementalDecoder | None = None
    finish: str = ""

    @property
    def answers(self) -> bool:
        return self.max_tokens > 0


@dataclass
class Slot:
    """One KV sequence and the prompt prefix it holds that may be reused."""

    seq: int
    tokens: list[int] = field(default_factory=list)
    job: Job | None = None
    used_at: float = 0.0


def reusable_prefix(cached: list[int] | tuple[int, ...], tokens: list[int], block: int) -> int:
    """How much of ``cached`` a read of ``tokens`` may keep: their common prefix, cut down to
    a multiple of ``block`` and short of the last token (its logits are needed)."""
    n = 0
    limit = min(len(cached), len(tokens) - 1)
    while n < limit and cached[n] == tokens[n]:
        n += 1
    return n - n % block


class Decoder:
    def __init__(self, model: Model, context: Context, *, block: int, flush_interval_s: float,
                 save_state: SaveState, load_state: LoadState,
                 chunk_while_streaming: int = 32, step_gate: StepGate | None = None) -> None:
        if chunk_while_streaming % block or context.shape.n_batch < block:
            raise ValueError("prompt chunks must be whole blocks")
        self.model = model
        self.context = context
        self.block = block
        self.flush_interval_s = flush_interval_s
        self.save_state = save_state
        self.load_state = load_state
        self.chunk_while_streaming = chunk_while_streaming
        self.full_chunk = context.shape.n_batch - context.shape.n_batch % block
        self.step_gate = step_gate or nullcontext
        self.batch = Batch(context.shape.n_batch)
        self.slots = [Slot(i) for i in range(context.shape.n_seq)]
        self._cond = threading.Condition()
        self._waiting: list[Job] = []
        self._pending: set[Job] = set()    # jobs with undelivered events
        self._closing = False
        self._last_flush = 0.0
        self._thread = threading.Thread(target=self._run, name="llm", daemon=True)
        self._thread.start()

    # --- other threads ---

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError("the LLM worker is closed")
            self._waiting.append(job)
            self._cond.notify()

    def wake(self) -> None:
        """A job was cancelled: a waiting one must leave the queue even if nothing runs."""
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        self.batch.close()

    # --- the worker thread ---

    def _run(self) -> None:
        active: list[Job] = []
        while True:
            with self._cond:
                while not (self._closing or active or self._admissible()):
                    self._cond.wait()
                if self._closing:
                    for job in [*self._waiting, *active]:
                        job.cancel.set()
                admitted = self._admit()
            for job in admitted:
                try:
                    self._start(job)
                except Exception as exc:  # e.g. a snapshot that no longer fits
                    log.exception("starting a generation failed")
                    self._fail(job, exc)
                    continue
                active.append(job)
            try:
                self._step(active)
            except Exception as exc:  # a failed decode fails its answers, never the worker
                log.exception("a llama decode step failed")
                for job in active:
                    self._fail(job, exc)
            was_busy = bool(active)
            active = [job for job in active if not job.finish]
            self._flush(force=not active)
            if was_busy and not active:
                memtrim.trim()  # the busy spell's buffers and replaced snapshots, given back
            if self._closing and not active and not self._waiting:
                return

    def _admissible(self) -> bool:
        return any(job.cancel.is_set() for job in self._waiting) or (
            bool(self._waiting) and any(s.job is None for s in self.slots))

    def _admit(self) -> list[Job]:
        """Give free slots to waiting jobs in arrival order (the fair queue chose it). A job
        whose session's head is being pre-read waits for that, then finds it resident."""
        admitted = []
        for job in list(self._waiting):
            if job.cancel.is_set():
                self._waiting.remove(job)
                self._end_unstarted(job)
                continue
            if job.cache_key is not None and any(
                    s.job is not None and not s.job.answers and s.job.cache_key == job.cache_key
                    for s in self.slots):
                continue
            free = [s for s in self.slots if s.job is None]
            if not free:
                break
            # The most reusable prefix; among equals the least recently used slot.
            slot = max(free, key=lambda s: (reusable_prefix(s.tokens, job.tokens, self.block),
                                            -s.used_at))
            slot.job = job
            job.seq = slot.seq
            self._waiting.remove(job)
            admitted.append(job)
        return admitted

    def _start(self, job: Job) -> None:
        """Bring the slot's KV to the longest reusable prefix: what it holds, or the session's
        snapshot when that one reuses more."""
        job.started = time.perf_counter()
        slot = self.slots[job.seq]
        reuse = reusable_prefix(slot.tokens, job.tokens, self.block)
        saved = self.load_state(job.cache_key) if job.cache_key else None
        if saved is not None:
            saved_reuse = reusable_prefix(saved[0], job.tokens, self.block)
            if saved_reuse > reuse:
                if self.context.restore(job.seq, saved[1]):
                    slot.tokens, reuse = list(saved[0]), saved_reuse
                else:
                    slot.tokens, reuse = [], 0
        if not self.context.truncate(job.seq, reuse):
            self.context.truncate(job.seq, 0)
            reuse = 0
        slot.tokens = slot.tokens[:reuse]
        job.read = job.cached = reuse
        if job.answers:
            assert job.sampling is not None
            job.sampler = Sampler(self.model, job.sampling)
            job.scanner = StopScanner(job.stop)
            job.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            self._put(job, Reading(reuse, len(job.tokens)), urgent=True)

    def _step(self, active: list[Job]) -> None:
        for job in active:
            if job.cancel.is_set() and not job.finish:
                self._end(job, "cancelled")
        writing = [j for j in active if not j.finish and j.next_token >= 0]
        for group in _groups(writing, MAX_DECODE_ROWS):
            batch = self.batch
            batch.clear()
            rows = [batch.add(j.next_token, len(j.tokens) + j.generated - 1, j.seq, True)
                    for j in group]
            self._decode()
            for job, row in zip(group, rows):
                self._sampled(job, job.sampler.sample(self.context, row))  # type: ignore[union-attr]
        # A question's prompt before any pre-reading: that is idle work.
        unread = [j for j in active if not j.finish and j.next_token < 0]
        reading = next((j for j in unread if j.answers), unread[0] if unread else None)
        if reading is not None:
            self._read_chunk(reading, streaming=bool(writing))

    def _read_chunk(self, job: Job, streaming: bool) -> None:
        """One chunk of the job's prompt: whole blocks from a block boundary, or the rest."""
        size = self.chunk_while_streaming if streaming else self.full_chunk
        end = min(len(job.tokens), job.read + size)
        batch = self.batch
        batch.clear()
        last = len(job.tokens) - 1
        row = -1
        for pos in range(job.read, end):
            row = max(row, batch.add(job.tokens[pos], pos, job.seq, pos == last and job.answers))
        self._decode()
        job.read = end
        slot = self.slots[job.seq]
        # A partial last block was computed alone: reuse stops at the block before it.
        slot.tokens = job.tokens[: end - end % self.block]
        if end < len(job.tokens):
            if job.answers:
                self._put(job, Reading(end, len(job.tokens)))
            return
        job.prompt_done = time.perf_counter()
        if job.answers:
            self._sampled(job, job.sampler.sample(self.context, row))  # type: ignore[union-attr]
        else:
            self._end(job, "stop")

    def _decode(self) -> None:
        with self.step_gate():
            self.context.decode(self.batch)

    def _sampled(self, job: Job, token: int) -> None:
        if self.model.is_eog(token):
            self._end(job, "stop")
            return
        job.generated += 1
        job.next_token = token
        assert job.scanner is not None and job.utf8 is not None
        text, stopped = job.scanner.feed(job.utf8.decode(self.model.piece(token)))
        if text:
            # Until the first visible text is out, every piece goes at once (time to first
            # token); then once per flush interval.
            self._put(job, Piece(text), urgent=not job.visible)
            job.visible = job.visible or not text.isspace()
        if stopped:
            self._end(job, "stop")
        elif job.generated >= job.max_tokens:
            self._end(job, "length")

    def _end(self, job: Job, finish: str) -> None:
        job.finish = finish
        end = time.perf_counter()
        slot = self.slots[job.seq]
        if job.answers:
            tail = job.scanner.flush() if finish == "length" and job.scanner else ""
            if tail:
                self._put(job, Piece(tail))
            prompt_done = job.prompt_done or end
            self._put(job, Finished(finish, len(job.tokens), job.cached, job.generated,
                                    (prompt_done - job.started) * 1000,
                                    (end - prompt_done) * 1000), urgent=True)
            job.sampler.close()  # type: ignore[union-attr]
        if job.cache_key and slot.tokens:
            # Keep the session's reusable prefix (the prompt's whole blocks read so far).
            self.context.truncate(job.seq, len(slot.tokens))
            self.save_state(job.cache_key, tuple(slot.tokens), self.context.save(job.seq))
        if job.share and finish == "stop" and slot.tokens:
            self._share(slot)
        slot.job = None
        slot.used_at = time.monotonic()
        if job.on_done is not None:
            job.on_done(job.read - job.cached)

    def _share(self, source: Slot) -> None:
        """Copy what ``source`` read (whole blocks) to every empty idle slot: the same KV
        bits as reading it there, in a copy instead of a prompt read."""
        self.context.truncate(source.seq, len(source.tokens))
        data: bytes | None = None
        for slot in self.slots:
            if slot is source or slot.job is not None or slot.tokens:
                continue
            data = data if data is not None else self.context.save(source.seq)
            if self.context.restore(slot.seq, data):
                slot.tokens = list(source.tokens)
            else:
                self.context.truncate(slot.seq, 0)

    def _fail(self, job: Job, exc: BaseException) -> None:
        if job.finish:
            return
        job.finish = "error"
        slot = self.slots[job.seq]
        slot.tokens = []
        self.context.truncate(job.seq, 0)
        slot.job = None
        if job.sampler is not None:
            job.sampler.close()
        if job.answers:
            self._put(job, exc, urgent=True)
        if job.on_done is not None:
            job.on_done(0)

    def _end_unstarted(self, job: Job) -> None:
        job.finish = "cancelled"
        if job.answers:
            self._put(job, Finished("cancelled", len(job.tokens), 0, 0, 0.0, 0.0), urgent=True)
        if job.on_done is not None:
            job.on_done(0)

    # --- the hand-off to the event loop ---

    def _put(self, job: Job, event: LlmEvent | BaseException, urgent: bool = False) -> None:
        if job.outbox is not None:
            job.outbox.put(event, urgent)
            self._pending.add(job)

    def _flush(self, force: bool) -> None:
        """Send what is due: everything once per flush interval (or when idle), urgent events
        (first text, the end) at once."""
        now = time.perf_counter()
        due = force or now - self._last_flush >= self.flush_interval_s
        jobs = [j for j in self._pending if due or j.outbox.urgent]  # type: ignore[union-attr]
        if due:
            self._last_flush = now
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Deliver, list]]] = {}
        for job in jobs:
            self._pending.discard(job)
            outbox = job.outbox
            assert outbox is not None
            by_loop.setdefault(outbox.loop, []).append((outbox.deliver, outbox.take()))
        for loop, batches in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, batches)
            except RuntimeError:  # that loop is closed: nobody listens any more
                pass


def _deliver_all(batches: list[tuple[Deliver, list[LlmEvent | BaseException]]]) -> None:
    for deliver, events in batches:
        deliver(events)


def _groups(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    for start in range(0, len(jobs), size):
        yield jobs[start : start + size]
