"""Operations metrics, exported to Prometheus through `ray.util.metrics`.

Every Ray node serves its processes' metrics in Prometheus text format on its metrics export port
(`ray start --metrics-export-port`, or `ray.init(_metrics_export_port=...)`); the Ray dashboard's
Metrics view and a Prometheus scraping that port (Ray writes a ready-made scrape config to
/tmp/ray/session_latest/metrics/prometheus/prometheus.yml) both show them. Ray prefixes names
with `ray_`, e.g. `ray_longmem_request_seconds_bucket{method="Score"}`.

Metric objects are created lazily, in the process that records them (a replica or an actor).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from functools import cache

from ray.util.metrics import Counter, Gauge, Histogram


class Metrics:
    def __init__(self, latency_buckets_s: list[float]):
        self.tokens_appended = Counter(
            "longmem_tokens_appended", "Tokens appended to memories (Append, Score with append, batch ingest).",
            tag_keys=("source",))
        self.tokens_scored = Counter(
            "longmem_tokens_scored", "Tokens scored (Score, ScoreChoices, batch scoring).", tag_keys=("source",))
        self.memory_tokens = Gauge(
            "longmem_memory_tokens", "Tokens held in memory, per shard.", tag_keys=("shard",))
        self.evictions = Counter(
            "longmem_evicted_tokens", "Tokens evicted (FIFO) from memories, per shard.", tag_keys=("shard",))
        self.search_seconds = Histogram(
            "longmem_search_seconds", "Latency of one memory search.", boundaries=latency_buckets_s,
            tag_keys=("component",))
        self.request_seconds = Histogram(
            "longmem_request_seconds", "Latency of one gRPC request, by method.", boundaries=latency_buckets_s,
            tag_keys=("method",))
        self.errors = Counter(
            "longmem_errors", "Failed gRPC requests, by method and status code.", tag_keys=("method", "code"))

    @contextmanager
    def timed(self, histogram: Histogram, tags: dict[str, str]):
        start = time.perf_counter()
        try:
            yield
        finally:
            histogram.observe(time.perf_counter() - start, tags=tags)


@cache
def metrics(latency_buckets_s: tuple[float, ...]) -> Metrics:
    """This process's metrics (one set per process)."""
    return Metrics(list(latency_buckets_s))
