"""Typed, minimal wrappers over llama-cpp-python's low-level C API (``llama_cpp.llama_*``).

The high-level ``llama_cpp.Llama`` runs one sequence per context; continuous batching needs the
C API: one context holding several sequences (each with its own KV stream), a ``llama_batch``
that mixes their tokens, and one sampler chain per sequence. Every object here is used by one
thread at a time (the LLM worker); tokenizing (Model) only reads the vocabulary and is safe from
any thread.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from .errors import ModelError

_silenced = False


def _silence_logs() -> None:
    """llama.cpp logs every tensor it loads to stderr; keep the server's log readable."""
    global _silenced
    if _silenced:
        return

    @llama_cpp.llama_log_callback
    def drop(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        return None

    llama_cpp.llama_log_set(drop, ctypes.c_void_p(0))
    _silence_logs.callback = drop  # type: ignore[attr-defined]  # kept alive for the C side
    _silenced = True


class Model:
    """Weights and vocabulary of one GGUF file."""

    def __init__(self, path: Path, *, use_mmap: bool = True, use_mlock: bool = False) -> None:
        _silence_logs()
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.load_mode = ((llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK if use_mlock
                             else llama_cpp.LLAMA_LOAD_MODE_MMAP) if use_mmap
                            else llama_cpp.LLAMA_LOAD_MODE_MLOCK if use_mlock
                            else llama_cpp.LLAMA_LOAD_MODE_NONE)
        self.ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise ModelError(f"cannot load the LLM {path}: llama.cpp refused the file")
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.ptr)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        data = text.encode()
        room = len(data) + 8
        for _ in range(2):  # a second try only if the first guess was too small
            buffer = (llama_cpp.llama_token * room)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, room, add_bos,
                                         special)
            if n >= 0:
                return list(buffer[:n])
            room = -n
        raise ModelError("tokenizing failed")

    def piece(self, token: int, *, special: bool = False) -> bytes:
        if token < 0:  # the model has no such token (no BOS, say)
            return b""
        buffer = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, 64, 0, special)
        if n < 0:  # longer than 64 bytes: ask again with the size it needs
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, -n, 0, special)
        return buffer.raw[:n]

    def detokenize(self, tokens: list[int], *, special: bool = False) -> bytes:
        return b"".join(self.piece(t, special=special) for t in tokens)

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def metadata(self, key: str) -> str | None:
        size = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), None, 0)
        if size < 0:
            return None
        buffer = ctypes.create_string_buffer(size + 1)
        llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buffer, size + 1)
        return buffer.value.decode(errors="replace")


@dataclass(frozen=True)
class ContextShape:
    n_ctx_seq: int       # tokens each sequence may hold
    n_seq: int           # sequences decoded together (slots), each with its own KV stream
    n_batch: int         # tokens per llama_decode call (prompt chunks and decode steps)
    threads: int
    # Off, as llama_cpp.Llama has it: the CPU flash-attention kernel changes its arithmetic at
    # 64 query rows, so a prompt's KV would depend on how it was chunked.
    flash_attn: bool = False
    kv_type: int = llama_cpp.GGML_TYPE_F16


class Context:
    """A llama context with ``n_seq`` independent KV streams (kv_unified off): a sequence's
    cells, and so its attention arithmetic, are laid out as if it ran alone."""

    def __init__(self, model: Model, shape: ContextShape) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = shape.n_ctx_seq * shape.n_seq
        params.n_batch = params.n_ubatch = shape.n_batch
        params.n_seq_max = shape.n_seq
        # Logits only for the last token of each sequence in a step: reserving room for
        # n_batch rows of a 262k vocabulary would cost 128 MB of compute buffer.
        params.n_outputs_max = shape.n_seq
        params.kv_unified = False
        params.n_threads = params.n_threads_batch = shape.threads
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if shape.flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.type_k = params.type_v = shape.kv_type
        params.no_perf = True
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise ModelError("llama.cpp could not create a context (out of memory?)")
        self.memory = llama_cpp.llama_get_memory(self.ptr)
        self.shape = shape
        self.model = model

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_free(self.ptr)
            self.ptr = None

    def set_threads(self, threads: int) -> None:
        llama_cpp.llama_set_n_threads(self.ptr, threads, threads)

    def decode(self, batch: Batch) -> None:
        status = llama_cpp.llama_decode(self.ptr, batch.raw)
        if status != 0:
            raise ModelError(f"llama_decode failed ({status}): "
                             + ("no room in the KV cache" if status == 1 else "internal error"))

    def truncate(self, seq: int, keep: int) -> bool:
        """Drop the sequence's cells from position ``keep`` on (``keep`` 0: all of them)."""
        return bool(llama_cpp.llama_memory_seq_rm(self.memory, seq, keep, -1))

    def save(self, seq: int) -> bytes:
        """The sequence's KV cells, copied in C (a Python-level copy would hold the GIL)."""
        size = llama_cpp.llama_state_seq_get_size(self.ptr, seq)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.ptr, buffer, size, seq)
        return ctypes.string_at(buffer, written)

    def restore(self, seq: int, data: bytes) -> bool:
        self.truncate(seq, 0)
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return llama_cpp.llama_state_seq_set_data(self.ptr, buffer, len(data), seq) == len(data)


class Batch:
    """A reusable llama_batch of up to ``capacity`` tokens, one sequence id each."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.size = 0
        self.outputs = 0

    def close(self) -> None:
        if self.raw is not None:
            llama_cpp.llama_batch_free(self.raw)
            self.raw = None

    def clear(self) -> None:
        self.size = self.outputs = 0
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append one token; returns the output index of its logits (or -1)."""
        i = self.size
        raw = self.raw
        raw.token[i] = token
        raw.pos[i] = pos
        raw.n_seq_id[i] = 1
        raw.seq_id[i][0] = seq
        raw.logits[i] = logits
        self.size = raw.n_tokens = i + 1
        if logits:
            self.outputs += 1
        return i if logits else -1


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int = 0


class Sampler:
    """One request's sampler chain, the same chain llama_cpp.Llama builds for these values
    (so answers match the library's own), with its own state (penalty history, RNG)."""

    def __init__(self, model: Model, s: Sampling) -> None:
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        self.ptr = llama_cpp.llama_sampler_chain_init(params)
        add = lambda sampler: llama_cpp.llama_sampler_chain_add(self.ptr, sampler)  # noqa: E731
        add(llama_cpp.llama_sampler_init_penalties(model.n_vocab, s.penalty_last_n,
                                                   s.repeat_penalty, s.frequency_penalty,
                                                   s.presence_penalty))
        if s.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            add(llama_cpp.llama_sampler_init_top_k(s.top_k))
            add(llama_cpp.llama_sampler_init_typical(1.0, 1))
            add(llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(s.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(s.temperature))
            add(llama_cpp.llama_sampler_init_dist(s.seed))

    def sample(self, context: Context, output: int) -> int:
        """The next token from the logits at batch index ``output`` (accepted into the chain)."""
        return llama_cpp.llama_sampler_sample(self.ptr, context.ptr, output)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None
