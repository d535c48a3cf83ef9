"""A bounded load generator for a running LongMem endpoint (loopback or your own cluster).

N client threads, each with its own memory, send a mix of Append, Score and Generate for a fixed
time (and at most a fixed number of requests), then the run reports throughput, latency
percentiles per RPC and errors by status code.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import grpc

from .client import LongMemClient, LongMemError
from .report import markdown_table

TEXT = ("Long-term memory lets a language model read what it saw long ago. The frozen backbone encodes the "
        "past; the side network retrieves what it needs. ")


@dataclass
class LoadReport:
    seconds: float
    requests: int
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter = field(default_factory=Counter)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, rpc: str, q: float) -> float:
        values = sorted(self.latencies[rpc])
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    def table(self) -> str:
        rows = [[rpc, len(values), f"{1000 * self.percentile(rpc, 0.5):.0f}", f"{1000 * self.percentile(rpc, 0.99):.0f}",
                 f"{1000 * statistics.mean(values):.0f}"] for rpc, values in sorted(self.latencies.items())]
        return (f"{self.requests} requests in {self.seconds:.1f} s: {self.throughput:.1f} req/s; "
                f"errors: {dict(self.errors) or 0}\n" + markdown_table(["rpc", "ok", "p50 ms", "p99 ms", "mean ms"], rows))


def run_load(target: str, clients: int, seconds: float, max_requests: int, api_key: str | None = None,
             mix: tuple[float, float, float] = (0.4, 0.4, 0.2), max_new_tokens: int = 4,
             capacity_tokens: int = 4096, seed: int = 0, tls_root_cert: bytes | None = None) -> LoadReport:
    """mix: the shares of Append, Score and Generate."""
    report = LoadReport(seconds=0.0, requests=0)
    lock = threading.Lock()
    sent = [0]
    deadline = time.monotonic() + seconds

    def take() -> bool:
        with lock:
            if sent[0] >= max_requests or time.monotonic() >= deadline:
                return False
            sent[0] += 1
            return True

    def worker(w: int) -> None:
        rng = random.Random(seed * 1000 + w)
        memory_id = f"load-{seed}-{w}"
        # retry_s=0: every answer is counted as the server gave it, none hidden by a resend
        with LongMemClient(target, api_key=api_key, tls_root_cert=tls_root_cert, timeout=120, retry_s=0) as client:
            try:
                client.create_memory(memory_id=memory_id, capacity_tokens=capacity_tokens)
            except LongMemError as e:
                if e.code != grpc.StatusCode.ALREADY_EXISTS:
                    with lock:
                        report.errors[e.code.name] += 1
                    return
            try:
                while take():
                    rpc = rng.choices(["Append", "Score", "Generate"], weights=mix)[0]
                    start = time.monotonic()
                    try:
                        if rpc == "Append":
                            client.append(memory_id, text=TEXT * rng.randint(1, 3))
                        elif rpc == "Score":
                            client.score(text=TEXT, memory_id=memory_id)
                        else:
                            client.generate_text("The side network", memory_id=memory_id,
                                                 max_new_tokens=max_new_tokens)
                        with lock:
                            report.latencies[rpc].append(time.monotonic() - start)
                    except LongMemError as e:
                        with lock:
                            report.errors[e.code.name] += 1
            finally:
                try:
                    client.delete_memory(memory_id)
                except LongMemError:
                    pass

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 300)
    report.seconds = time.monotonic() - started
    report.requests = sum(len(v) for v in report.latencies.values()) + sum(report.errors.values())
    return report
