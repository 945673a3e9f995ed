"""Vector search: edgekb.index.VectorIndex against exact search and against raw hnswlib.

Random normalised 384-d vectors (embedding excluded): recall@5 against exact cosine search with
numpy, query latency per call, and at 10k the same queries on a bare hnswlib index built with
edgekb's parameters in the same run. The vectors are embedding-like: a random 24-d latent
projected to 384-d plus noise, as real sentence embeddings have a low intrinsic dimension.
Uniform random vectors are the worst case for HNSW (every similarity crowds near 0: recall@5
about 0.42 at 10k and 0.09 at 100k with ef 64), reported once at 10k for reference. Then real
queries (generated questions) embedded by edgekb's Embedder, embedding included. Memory of the
100k index is this process's RSS growth while building it (the vectors are allocated before).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import hnswlib
import numpy as np

from edgekb import index as edgekb_index
from edgekb.engines import load_embedder, open_catalog
from edgekb.index import VectorIndex

from .common import Sheet, bench_settings, log, percentile, proc_status_kb, ratio
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


def _interleaved_ms(first, second, queries: np.ndarray  # type: ignore[no-untyped-def]
                    ) -> tuple[list[float], list[list[int]], list[float], list[list[int]]]:
    """Both searches query by query, alternating which goes first, so a burst of machine noise
    hits both sides alike."""
    a_times, a_found, b_times, b_found = [], [], [], []
    for number, query in enumerate(queries):
        order = ((first, a_times, a_found), (second, b_times, b_found))
        for search, times, found in order if number % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            found.append(search(query))
            times.append((time.perf_counter() - started) * 1000)
    return a_times, a_found, b_times, b_found


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
    n_queries = 1000
    basis = rng.standard_normal((24, DIM), dtype=np.float32)
    log("index: 10k embedding-like vectors, edgekb VectorIndex and bare hnswlib")
    data = _embedding_like(rng, 10_000, basis)
    queries = _embedding_like(rng, n_queries, basis)
    index, build_s = _build(data, work / "index-10k.bin")
    raw = hnswlib.Index(space="cosine", dim=DIM)
    raw.init_index(max_elements=len(data), M=edgekb_index.M,
                   ef_construction=edgekb_index.EF_CONSTRUCTION)
    raw.add_items(data, np.arange(1, len(data) + 1))
    raw.set_ef(edgekb_index.EF_SEARCH)
    times, found, raw_times, raw_found = _interleaved_ms(
        _edgekb_search(index), lambda q: raw.knn_query(q, k=K)[0][0].tolist(), queries)
    kind = (f"random embedding-like 384-d vectors (a 24-d latent projected to 384-d plus "
            f"noise, normalised), {n_queries} queries of the same kind")
    sheet.put("query_p50_ms_10k", percentile(times, 50),
              f"edgekb VectorIndex.search k=5, embedding excluded, 10k {kind}", 4)
    sheet.put("query_p99_ms_10k", percentile(times, 99), "same queries, p99", 4)
    sheet.put("query_p50_ratio_10k", ratio(percentile(times, 50), percentile(raw_times, 50)),
              "edgekb p50 / bare hnswlib p50 (same parameters, vectors and queries, queried "
              "alternately in the same run)")
    sheet.put("query_p99_ratio_10k", ratio(percentile(times, 99), percentile(raw_times, 99)),
              "the same at p99")
    sheet.put("recall_at_5_10k", _recall(data, queries, found),
              "recall@5 of edgekb's index against exact numpy cosine search, same queries", 4)
    sheet.detail("index_10k", {"build_s": round(build_s, 2),
                               "raw_p99_ms": round(percentile(raw_times, 99), 4),
                               "raw_recall_at_5": _recall(data, queries, raw_found)})

    log("index: 10k with real queries embedded by edgekb's Embedder")
    settings = bench_settings(work / "index")
    embedder = load_embedder(settings, open_catalog(settings))
    texts = questions(100 if quick else 300)
    embedder.embed(texts[0])  # warm-up
    embed_times, _ = _latencies_ms(lambda q: [label for label, _ in
                                              index.search(embedder.embed(q), K)], texts)
    sheet.put("query_p99_ms_embed_10k", percentile(embed_times, 99),
              f"embed one question (edgekb Embedder) + VectorIndex.search, 10k vectors, "
              f"{len(texts)} generated questions, p99", 3)

    log("index: 10k uniform random vectors")
    data = _normalised(rng, 10_000)
    uniform_queries = _normalised(rng, n_queries)
    index, _ = _build(data, work / "index-10k-uniform.bin")
    times, found = _latencies_ms(_edgekb_search(index), uniform_queries)
    sheet.put("recall_at_5_10k_uniform", _recall(data, uniform_queries, found),
              "recall@5 on uniform random 384-d vectors and queries: the worst case for HNSW "
              "(every similarity crowds near 0), far from what embeddings look like", 4)
    sheet.put("query_p99_ms_10k_uniform", percentile(times, 99), "p99 of those queries", 4)

    if quick:
        for key in ("query_p99_ms_100k", "recall_at_5_100k", "rss_100k_mb"):
            sheet.put(key, None, "not measured with --quick")
        return
    log("index: 100k embedding-like vectors (the build takes one to two minutes)")
    data = _embedding_like(rng, 100_000, basis)
    before = proc_status_kb(os.getpid(), "VmRSS")
    index, build_s = _build(data, work / "index-100k.bin")
    grown = (proc_status_kb(os.getpid(), "VmRSS") - before) / 1024
    times, found = _latencies_ms(_edgekb_search(index), queries)
    sheet.put("query_p99_ms_100k", percentile(times, 99),
              f"edgekb VectorIndex.search k=5, 100k {kind}, p99", 4)
    sheet.put("recall_at_5_100k", _recall(data, queries, found),
              "recall@5 against exact numpy search, same queries", 4)
    sheet.put("rss_100k_mb", grown, "RSS growth of this process while building the 100k "
              "index (vectors allocated before); design figure: 170 MB", 1)
    sheet.detail("index_100k", {"build_s": round(build_s, 1)})
