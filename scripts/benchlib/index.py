"""Vector search: edgekb.index.VectorIndex against exact search and against raw hnswlib.

Random normalised 384-d vectors (embedding excluded): recall@5 against exact cosine search with
numpy, query latency per call, and at 10k the same queries on a bare hnswlib index built with
edgekb's parameters in the same run. Uniform random vectors are the hardest case for HNSW (all
similarities crowd around 0, recall@5 near 0.4 at ef 64), so recall is also measured on
embedding-like vectors: a random 24-d latent projected to 384-d plus noise, which is how real
sentence embeddings behave (low intrinsic dimension). Then real queries (generated questions)
embedded by edgekb's Embedder, embedding included. Memory of the 100k index is this process's
RSS growth while building it (the vectors themselves are allocated before).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import hnswlib
import numpy as np

from edgekb import index as edgekb_index
from edgekb.config import load_settings
from edgekb.engines import load_embedder, open_catalog
from edgekb.index import VectorIndex

from .common import Sheet, edgekb_env, log, percentile, proc_status_kb, ratio
from .corpus import questions

DIM = 384
K = 5
BATCH = 1000  # vectors per add, as an ingest of many documents adds them


def _normalised(rng: np.random.Generator, n: int) -> np.ndarray:
    vectors = rng.standard_normal((n, DIM), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _embedding_like(rng: np.random.Generator, n: int, basis: np.ndarray) -> np.ndarray:
    latent = rng.standard_normal((n, basis.shape[0]), dtype=np.float32)
    noise = rng.standard_normal((n, DIM), dtype=np.float32)
    vectors = latent @ basis + 0.3 * noise
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _latencies_ms(search, queries: np.ndarray) -> tuple[list[float], list[list[int]]]:  # type: ignore[no-untyped-def]
    times, found = [], []
    for query in queries:
        started = time.perf_counter()
        labels = search(query)
        times.append((time.perf_counter() - started) * 1000)
        found.append(labels)
    return times, found


def _recall(data: np.ndarray, queries: np.ndarray, found: list[list[int]]) -> float:
    hits = 0
    for query, labels in zip(queries, found):
        exact = np.argpartition(-(data @ query), K)[:K] + 1  # labels start at 1
        hits += len(set(exact.tolist()) & set(labels))
    return hits / (K * len(queries))


def _build(data: np.ndarray, path: Path) -> tuple[VectorIndex, float]:
    index = VectorIndex(DIM, path, "bench")
    started = time.perf_counter()
    for start in range(0, len(data), BATCH):
        index.add(list(range(start + 1, start + 1 + len(data[start:start + BATCH]))),
                  data[start:start + BATCH])
    return index, time.perf_counter() - started


def _edgekb_search(index: VectorIndex):  # type: ignore[no-untyped-def]
    return lambda q: [label for label, _ in index.search(q, K)]


def run(sheet: Sheet, work: Path, quick: bool) -> None:
    rng = np.random.default_rng(3)
    n_queries = 300 if quick else 1000
    log("index: 10k random vectors, edgekb VectorIndex and bare hnswlib")
    data = _normalised(rng, 10_000)
    queries = _normalised(rng, n_queries)
    index, build_s = _build(data, work / "index-10k.bin")
    times, found = _latencies_ms(_edgekb_search(index), queries)
    raw = hnswlib.Index(space="cosine", dim=DIM)
    raw.init_index(max_elements=len(data), M=edgekb_index.M,
                   ef_construction=edgekb_index.EF_CONSTRUCTION)
    raw.add_items(data, np.arange(1, len(data) + 1))
    raw.set_ef(edgekb_index.EF_SEARCH)
    raw_times, raw_found = _latencies_ms(lambda q: raw.knn_query(q, k=K)[0][0].tolist(),
                                         queries)
    sheet.put("query_p50_ms_10k", percentile(times, 50),
              f"edgekb VectorIndex.search k=5, 10k random 384-d vectors, {n_queries} queries", 4)
    sheet.put("query_p99_ms_10k", percentile(times, 99), "same queries, p99", 4)
    sheet.put("query_p99_ratio_10k", ratio(percentile(times, 99), percentile(raw_times, 99)),
              "edgekb p99 / bare hnswlib p99 (same parameters, same vectors and queries)")
    sheet.put("recall_at_5_10k", _recall(data, queries, found),
              "recall@5 of edgekb's index against exact numpy cosine search, same uniform random"
              " queries (the hardest case for HNSW; see recall_at_5_10k_embedding_like)", 4)
    sheet.detail("index_10k", {"build_s": round(build_s, 2),
                               "raw_p99_ms": round(percentile(raw_times, 99), 4),
                               "raw_recall_at_5": _recall(data, queries, raw_found)})

    basis = rng.standard_normal((24, DIM), dtype=np.float32)
    data = _embedding_like(rng, 10_000, basis)
    like_queries = _embedding_like(rng, n_queries, basis)
    index, _ = _build(data, work / "index-10k-like.bin")
    _, found = _latencies_ms(_edgekb_search(index), like_queries)
    sheet.put("recall_at_5_10k_embedding_like", _recall(data, like_queries, found),
              f"recall@5 of edgekb's index, 10k embedding-like vectors (24-d latent projected to "
              f"384-d plus noise), {n_queries} queries of the same kind, against exact search", 4)

    log("index: 10k with real queries embedded by edgekb's Embedder")
    settings = load_settings(None, env=edgekb_env(), overrides={"data_dir": work / "index"})
    embedder = load_embedder(settings, open_catalog(settings))
    texts = questions(100 if quick else 300)
    embedder.embed(texts[0])  # warm-up
    embed_times, _ = _latencies_ms(lambda q: [label for label, _ in
                                              index.search(embedder.embed(q), K)], texts)
    sheet.put("query_p99_ms_embed_10k", percentile(embed_times, 99),
              f"embed one question (edgekb Embedder) + VectorIndex.search, 10k vectors, "
              f"{len(texts)} generated questions, p99", 3)

    if quick:
        for key in ("query_p99_ms_100k", "recall_at_5_100k", "rss_100k_mb"):
            sheet.put(key, None, "not measured with --quick")
        return
    log("index: 100k random vectors (build takes about a minute)")
    data = _normalised(rng, 100_000)
    before = proc_status_kb(os.getpid(), "VmRSS")
    index, build_s = _build(data, work / "index-100k.bin")
    grown = (proc_status_kb(os.getpid(), "VmRSS") - before) / 1024
    times, found = _latencies_ms(_edgekb_search(index), queries)
    sheet.put("query_p99_ms_100k", percentile(times, 99),
              f"edgekb VectorIndex.search k=5, 100k random vectors, {n_queries} queries, p99", 4)
    sheet.put("recall_at_5_100k", _recall(data, queries, found),
              "recall@5 against exact numpy search, same queries", 4)
    sheet.put("rss_100k_mb", grown, "RSS growth of this process while building the 100k "
              "index (vectors allocated before); design figure: 170 MB", 1)
    sheet.detail("index_100k", {"build_s": round(build_s, 1)})
