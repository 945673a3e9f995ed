"""Ingest throughput against raw onnxruntime, and the peak memory of `edgekb ingest`.

edgekb's side is the whole Ingestor (read, chunk, embed, SQLite, hnswlib, save) on a generated
folder. The raw side is tokenizers + onnxruntime with the same session options on the same
texts (what the ingest embedded: title > heading + chunk text, read back from SQLite), in the
same batch shapes (sorted by length, packed under edgekb's count and token budget), with the
same mean pooling. Ingest and raw take turns, and each ingest is compared with the raw runs on
either side of it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edgekb.catalog import verify
from edgekb.config import Settings
from edgekb.embed import TOKENS_PER_RUN, Embedder
from edgekb.engines import load_embedder, make_ingestor, open_catalog, open_library
from edgekb.ingest import embedding_text
from edgekb.store import Store

from .common import Sheet, bench_settings, edgekb_env, log, median, ratio
from .corpus import write_manuals


class RawEmbedder:
    """tokenizers + onnxruntime, configured as edgekb configures them."""

    def __init__(self, settings: Settings) -> None:
        entry = open_catalog(settings).get(settings.models.embedder, kind="embedder")
        paths = verify(settings.models_cache, entry)
        self.dim = int(entry.settings["dim"])
        self.batch_size = settings.embedding.batch_size
        self.token_budget = TOKENS_PER_RUN
        self.tokenizer = Tokenizer.from_file(str(paths["tokenizer"]))
        self.tokenizer.enable_truncation(max_length=int(entry.settings.get("max_tokens", 256)))
        self.tokenizer.no_padding()
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.embedding.threads or min(2, os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(paths["model"]), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def embed_all(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Vectors of every text, and the number of onnxruntime runs."""
        encodings = self.tokenizer.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        runs = 0
        batch: list[int] = []
        for i in [*order, None]:
            longest = len(encodings[i].ids) if i is not None else 0
            if batch and (i is None or len(batch) >= self.batch_size
                          or (len(batch) + 1) * longest > self.token_budget):
                out[batch] = self._run([encodings[j] for j in batch])
                runs += 1
                batch = []
            if i is not None:
                batch.append(i)
        return out, runs

    def _run(self, encodings: list) -> np.ndarray:
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run(None, feeds)[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def stored_texts(db_path: Path) -> list[str]:
    store = Store(db_path)
    try:
        hits = store.chunks(store.chunk_ids("default"))
        return [embedding_text(h.title, h.heading, h.text) for h in hits.values()]
    finally:
        store.close()


def timed(fn, *args):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


# Forks and waits for its argv; prints the child's ru_maxrss (KiB). The launcher is needed:
# at exec the kernel records the *old* address space's peak as the child's ru_maxrss, and a
# child forked straight from this large bench process would report the bench's own peak.
_PEAK_LAUNCHER = ("import os, sys\n"
                  "pid = os.fork()\n"
                  "if pid == 0:\n"
                  "    os.execv(sys.argv[1], sys.argv[1:])\n"
                  "_, status, usage = os.wait4(pid, 0)\n"
                  "print(usage.ru_maxrss)\n"
                  "sys.exit(os.waitstatus_to_exitcode(status))\n")


def peak_ingest_rss_mb(folder: Path, data_dir: Path) -> tuple[float, float, int]:
    """(peak RSS in MB, wall seconds, exit status) of one `edgekb ingest` process."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _PEAK_LAUNCHER, sys.executable, "-m",
                             "edgekb", "ingest", "--data-dir", str(data_dir), str(folder)],
                            env=edgekb_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, check=False)
    peak_kb = int(result.stdout.strip().splitlines()[-1])
    return peak_kb / 1024, time.perf_counter() - started, result.returncode


def ingest_once(data_dir: Path, embedder: Embedder, folder: Path) -> tuple[float, int]:
    """(seconds, chunks) of edgekb's Ingestor on ``folder`` into a new data directory."""
    settings = bench_settings(data_dir)
    store = Store(settings.db_path)
    try:
        ingestor = make_ingestor(settings, store, embedder, open_library(settings, embedder))
        seconds, report = timed(ingestor.ingest, [folder])
    finally:
        store.close()
    return seconds, report.chunks


def run(sheet: Sheet, work: Path, quick: bool) -> None:
    target = 300 if quick else 3000
    rounds = 3 if quick else 2
    folder = work / "manuals"
    write_manuals(folder, target)
    settings = bench_settings(work / "ingest-0")
    embedder = load_embedder(settings, open_catalog(settings))
    raw = RawEmbedder(settings)
    raw.embed_all(["warm-up"])
    embedder.embed_batch(["warm-up"])
    # Ingest, raw, ingest, raw, ...: each ingest is compared with the raw runs on either side
    # of it (the first with the one after: the texts come from it). This VM's speed drifts by
    # up to ±10 % within a minute, as much as what is measured here.
    log(f"ingest: {rounds} rounds of edgekb's Ingestor on a generated folder (~{target} "
        "chunks), each followed by raw onnxruntime on the same texts")
    ingest_s: list[float] = []
    raw_s: list[float] = []
    texts: list[str] = []
    runs = chunks = 0
    for number in range(rounds):
        seconds, chunks = ingest_once(work / f"ingest-{number}", embedder, folder)
        ingest_s.append(seconds)
        texts = texts or stored_texts(settings.db_path)
        seconds, (_, runs) = timed(raw.embed_all, texts)
        raw_s.append(seconds)
    raw_rate = [len(texts) / s for s in raw_s]
    ratios = [ratio(chunks / s, (raw_rate[i] + raw_rate[max(i - 1, 0)]) / 2)
              for i, s in enumerate(ingest_s)]
    sheet.put("embed_ratio", median(ratios),
              f"chunks/s of edgekb's Ingestor (read, chunk, embed, SQLite, index, save) on a "
              f"generated folder of {chunks} chunks / chunks/s of raw tokenizers+onnxruntime on "
              f"the same texts in the same {runs} batch shapes, the raw runs just before and "
              f"after; median of {rounds} rounds")
    sheet.put("embed_ratio_min", min(ratios), f"the lowest of those {rounds} rounds")
    embed_s = None
    if not quick:  # a diagnostic: where a low embed_ratio comes from
        embed_s, _ = timed(embedder.embed_batch, texts)
        sheet.put("embed_only_ratio", ratio(len(texts) / embed_s, raw_rate[-1]),
                  "chunks/s of edgekb's Embedder.embed_batch alone on the same texts / the "
                  "raw run just before it; 1 run")
    sheet.put("ingest_chunks_per_s", chunks / median(ingest_s),
              f"edgekb Ingestor, median of {rounds}", 1)
    sheet.put("raw_embed_chunks_per_s", median(raw_rate), f"raw onnxruntime, median of {rounds}",
              1)
    sheet.detail("ingest", {"chunks": chunks, "ingest_s": [round(s, 2) for s in ingest_s],
                            "raw_s": [round(s, 2) for s in raw_s],
                            "ratios": [round(r, 3) for r in ratios],
                            "embed_only_s": embed_s and round(embed_s, 2), "onnx_runs": runs})
    log("ingest: peak RSS of an `edgekb ingest` process on the same folder")
    peak_mb, wall_s, status = peak_ingest_rss_mb(folder, work / "ingest-rss")
    sheet.put("rss_peak_ingest_mb", peak_mb if status == 0 else None,
              f"peak RSS (ru_maxrss, via a small launcher) of one `edgekb ingest` process on the generated folder "
              f"({chunks} chunks), 1 run" + ("" if status == 0 else f"; it exited {status}"), 1)
    sheet.detail("ingest_process_s", round(wall_s, 1))
