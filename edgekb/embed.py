"""Sentence embeddings with onnxruntime + tokenizers: mean pooling, L2-normalised.

Blocking: the server calls it from a thread. Batches are bounded in tokens, not only in count:
onnxruntime's memory arena grows to the largest shape it has seen (32x200-token batches grew the
process past 1 GB), so texts are sorted by length and packed under a token budget.

The graph onnxruntime's load-time optimiser makes of the model is saved once next to it and
loaded as is from then on: the optimiser folds the int8 weights' casts into float32 weights, and
running it at every start-up held its working copies too (RSS 159 -> 114 MB for MiniLM, outputs
bit for bit the same, load 0.26 -> 0.17 s).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from .errors import ModelError

log = logging.getLogger(__name__)

# Padded tokens per onnxruntime run. On 2 cores 200-token chunks embed as fast two at a time as
# ten at a time (27-28 chunks/s either way), and the arena's peak fell from 390 to 271 MB.
TOKENS_PER_RUN = 512


class Embedder:
    def __init__(self, model_path: Path, tokenizer_path: Path, *, dim: int, max_tokens: int = 256,
                 threads: int = 0, batch_size: int = 16, identity: str = "") -> None:
        self.dim = dim
        self.identity = identity  # recorded with each index: vectors of another model differ
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.token_budget = TOKENS_PER_RUN
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # The shipped tokenizer.json pads and truncates to 128: set both explicitly.
        self.tokenizer.enable_truncation(max_length=max_tokens)
        self.tokenizer.no_padding()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        optimized = optimized_graph(model_path)
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if optimized
                                            else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        try:
            self.session = ort.InferenceSession(str(optimized or model_path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"cannot load the embedder {model_path}: {exc}") from exc
        self._inputs = {i.name for i in self.session.get_inputs()}
        # Every onnxruntime run goes through this gate: the server makes runs and LLM decode
        # steps take turns on the cores (cpugate.py).
        self.gate: Callable[[], AbstractContextManager[object]] = nullcontext

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text without special tokens (what chunking budgets against)."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [len(e.ids) for e in encodings]

    def embed(self, text: str) -> np.ndarray:
        return self.embed_batch([text])[0]

    def embed_batch(self, texts: Sequence[str],
                    progress: Callable[[int], None] | None = None) -> np.ndarray:
        """One normalised float32 vector per text, in input order; ``progress`` is told how
        many are done after each onnxruntime run."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self.tokenizer.encode_batch(list(texts))
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        done = 0
        for batch in self._batches(order, [len(e.ids) for e in encodings]):
            out[batch] = self._run([encodings[i] for i in batch])
            done += len(batch)
            if progress is not None:
                progress(done)
        return out

    def _batches(self, order: list[int], lengths: list[int]) -> list[list[int]]:
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            longest = lengths[i]  # sorted ascending: the newest text is the longest so far
            if current and (len(current) >= self.batch_size
                            or (len(current) + 1) * longest > self.token_budget):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    def _run(self, encodings: list) -> np.ndarray:
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        with self.gate():
            hidden = self.session.run(None, feeds)[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


def optimized_graph(model_path: Path) -> Path | None:
    """The model as onnxruntime's optimiser leaves it, saved once beside the model (keyed by
    the onnxruntime version and the model file's size and time); None where it cannot be
    written (a read-only model cache): the session then optimises at every load."""
    stat = model_path.stat()
    target = model_path.with_name(f"{model_path.stem}.ort{ort.__version__}-{stat.st_size}-"
                                  f"{stat.st_mtime_ns}.optimized.onnx")
    if target.exists():
        return target
    options = ort.SessionOptions()
    # Extended, not all: the saved graph holds no layout tied to this CPU's instruction set.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    try:
        with tempfile.TemporaryDirectory(dir=model_path.parent, prefix=".optimizing-") as tmp:
            options.optimized_model_filepath = str(Path(tmp) / target.name)
            ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
            os.replace(options.optimized_model_filepath, target)  # whole, or not at all
        for stale in model_path.parent.glob(f"{model_path.stem}.ort*.optimized.onnx"):
            if stale != target:
                stale.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot save the optimised embedder graph beside %s (%s); optimising at "
                    "every start", model_path, exc)
        return None
    return target
