"""Prometheus metrics of one appliance, through prometheus-client.

Counters and histograms move as things happen (the conversation core, the transports and the
document API call the methods below); gauges are read when /metrics is scraped (health.py).
One registry per application, not prometheus-client's global one: tests run many apps in one
process, and nothing here is a singleton. Labels carry only fixed words (outcomes, error codes,
transports, ingest results), never content: no question, session, user or document name.
"""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.process_collector import ProcessCollector

# Seconds to the first token: from an answer already cached (~0.2 s) to a long prompt on a Pi.
TTFT_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0)
TOKENS_PER_S_BUCKETS = (2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 150.0)
TRANSPORTS = ("ws", "sse", "openai")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        # process_resident_memory_bytes, CPU seconds, open fds: the process's own figures.
        ProcessCollector(registry=reg)
        self.requests = Counter(
            "edgekb_requests", "Requests ended, by outcome: stop, length, cancelled, or the "
            "error code that ended them (interrupted, storage_error, internal)", ["outcome"],
            registry=reg)
        self.refusals = Counter(
            "edgekb_refusals", "Questions refused before anything was stored, by code (busy, "
            "rate_limited, disk_full, storage_error, id_reuse)", ["code"], registry=reg)
        self.ttft = Histogram("edgekb_time_to_first_token_seconds",
                              "From the question taken from the queue to its first token",
                              buckets=TTFT_BUCKETS, registry=reg)
        self.tokens_per_s = Histogram("edgekb_generation_tokens_per_second",
                                      "Tokens per second of each answer's generation",
                                      buckets=TOKENS_PER_S_BUCKETS, registry=reg)
        self.resumes = Counter("edgekb_resumes", "Follows of a request after its first: a "
                               "client resuming, or a second device", registry=reg)
        self.replayed = Counter("edgekb_replayed_events", "Stored events sent again to "
                                "resuming clients", registry=reg)
        self.heartbeat_closes = Counter(
            "edgekb_heartbeat_closes", "Connections dropped because the peer stopped answering "
            "(ws: no frame nor TCP acknowledgement; sse, openai: a write stalled)",
            ["transport"], registry=reg)
        self.ingested = Counter("edgekb_ingested_files", "Files through the document API, by "
                                "result (added, updated, unchanged, removed, failed)",
                                ["status"], registry=reg)
        self.connections = Gauge("edgekb_connections", "Open connections: WebSocket, native "
                                 "SSE streams, OpenAI-compatible streams", ["transport"],
                                 registry=reg)
        self.queue_waiting = Gauge("edgekb_queue_waiting", "Questions waiting for the LLM",
                                   registry=reg)
        self.index_vectors = Gauge("edgekb_index_vectors", "Vectors in the in-memory indexes, "
                                   "all knowledge bases", registry=reg)
        self.documents = Gauge("edgekb_documents", "Documents stored, all knowledge bases",
                               registry=reg)
        self.chunks = Gauge("edgekb_chunks", "Chunks stored, all knowledge bases", registry=reg)
        for transport in TRANSPORTS:  # every series exists from the start, at 0
            self.connections.labels(transport)
            self.heartbeat_closes.labels(transport)

    def refused(self, code: str) -> None:
        self.refusals.labels(code).inc()

    def ended(self, outcome: str, last_frame: str) -> None:
        """A request's end; its last event (done) carries the timings."""
        self.requests.labels(outcome).inc()
        event = json.loads(last_frame)
        if event.get("type") != "done":
            return
        timings = event.get("timings") or {}
        if isinstance(timings.get("ttft_ms"), (int, float)):
            self.ttft.observe(timings["ttft_ms"] / 1000)
        if isinstance(timings.get("tokens_per_s"), (int, float)):
            self.tokens_per_s.observe(timings["tokens_per_s"])

    def followed(self, *, resume: bool, replayed: int) -> None:
        if resume:
            self.resumes.inc()
        if replayed:
            self.replayed.inc(replayed)

    def heartbeat_closed(self, transport: str) -> None:
        self.heartbeat_closes.labels(transport).inc()

    def file_ingested(self, status: str) -> None:
        self.ingested.labels(status).inc()
