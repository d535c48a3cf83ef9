"""Chaos under load, for `longmem soak` and the chaos tests: the services on a simulated cluster on
this machine, faults injected into it one at a time, a bounded loopback workload whose clients record
every answer, and the checks afterwards.

Faults (FAULTS): kill -9 of a shard, of the bank, of an encoder, reader or gateway replica, and the
removal of a memory node (a spare joins first, so that its shard has somewhere to go). After the load,
each client's memory must equal a fault-free replay of the appends it was told succeeded (the same
counters, and the same retrieval for every check query), every request must have succeeded in the end
(resent while the service answered UNAVAILABLE), and the only failed answers allowed are UNAVAILABLE
and DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import ray
from ray.cluster_utils import Cluster

from longmem.client import LongMemClient, LongMemError, resend
from longmem.config import SOAK_RPCS, LongMemConfig

from .app import serve_environment, serving
from .bank import get_bank, shard_names

log = logging.getLogger("longmem.chaos")

ALLOWED = ("UNAVAILABLE", "DEADLINE_EXCEEDED")  # the failed answers a fault may cause; each is resent


@dataclass
class Simulated:
    """A running LongMem on a ray.cluster_utils.Cluster: a head node and one node per shard."""
    config: LongMemConfig
    cluster: Cluster
    memory_nodes: list = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.config.serve.grpc_port}"

    def add_memory_node(self):
        node = self.cluster.add_node(num_cpus=self.config.soak.node_cpus,
                                     resources={self.config.serve.shard_resource: 1})
        self.memory_nodes.append(node)
        return node


@contextlib.contextmanager
def simulated_cluster(config: LongMemConfig) -> Iterator[Simulated]:
    """Starts the cluster (head + serve.num_shards memory nodes), Serve with the gRPC API and the
    application; stops all of it on exit."""
    serve_environment(config)
    sim = Simulated(config, Cluster(initialize_head=True, head_node_args={"num_cpus": config.soak.head_cpus}))
    try:
        for _ in range(config.serve.num_shards):
            sim.add_memory_node()
        ray.init(address=sim.cluster.address, namespace=config.serve.namespace)
        with serving(config):
            yield sim
    finally:
        ray.shutdown()  # a no-op where Ray did not start
        sim.cluster.shutdown()


# ---- faults ---------------------------------------------------------------------------------------
def actor_pid(handle) -> int:
    return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=60)


def replica_pids(deployment: str) -> list[int]:
    """The process ids of a Serve deployment's running replicas."""
    return [actor_pid(ray.get_actor(a["name"], namespace=a["namespace"]))
            for a in ray.util.list_named_actors(all_namespaces=True) if f"#{deployment}#" in a["name"]]


def kill_shard(sim: Simulated, rng: random.Random) -> str:
    name = rng.choice(shard_names(sim.config))
    os.kill(actor_pid(ray.get_actor(name, namespace=sim.config.serve.namespace)), signal.SIGKILL)
    return f"kill -9 {name}"


def kill_bank(sim: Simulated, rng: random.Random) -> str:
    os.kill(actor_pid(get_bank(sim.config)), signal.SIGKILL)
    return "kill -9 the bank"


def kill_replica(deployment: str) -> Callable[[Simulated, random.Random], str]:
    def kill(sim: Simulated, rng: random.Random) -> str:
        os.kill(rng.choice(replica_pids(deployment)), signal.SIGKILL)
        return f"kill -9 a {deployment} replica"
    return kill


def remove_node(sim: Simulated, rng: random.Random) -> str:
    name = rng.choice(shard_names(sim.config))
    shard = ray.get_actor(name, namespace=sim.config.serve.namespace)
    node_id = ray.get(shard.stats.remote(), timeout=60).node_id
    sim.add_memory_node()
    node = next(n for n in sim.memory_nodes if n.node_id == node_id)
    sim.cluster.remove_node(node)
    sim.memory_nodes.remove(node)
    return f"remove the node of {name}"


FAULTS: dict[str, Callable[[Simulated, random.Random], str]] = {
    "shard": kill_shard, "bank": kill_bank, "encoder": kill_replica("EncoderDeployment"),
    "reader": kill_replica("ReaderDeployment"), "gateway": kill_replica("Gateway"), "node": remove_node}


# ---- workload -------------------------------------------------------------------------------------
def resent(call: Callable[..., object], *args, done: str, retry_s: float) -> None:
    """A create or delete of the soak's own memories, which the client does not resend: resent while it
    answers UNAVAILABLE; the `done` code (ALREADY_EXISTS, NOT_FOUND) then means an earlier send landed."""
    def send() -> None:
        try:
            call(*args)
        except LongMemError as e:
            if e.code.name != done:
                raise
    resend(send, retry_s, lambda e: e.code.name == "UNAVAILABLE")


@dataclass
class ClientLog:
    """What one client did and heard."""
    memory_id: str
    appended: list[list[int]] = field(default_factory=list)  # acknowledged appends, in order
    requests: Counter = field(default_factory=Counter)  # rpc -> requests that succeeded in the end
    answers: Counter = field(default_factory=Counter)  # status code name -> answers (resent ones too)
    failed: list[str] = field(default_factory=list)  # requests that never succeeded: "rpc: code: details"


class Workload:
    """`clients` threads, each with its own memory (striped over every shard), sending a random mix of
    Append (token ids), Score, Generate, Retrieve and Chat (the memory is the conversation's session)
    until stopped or `max_requests` each. A request is resent while it answers UNAVAILABLE or
    DEADLINE_EXCEEDED, for up to soak.retry_s (an append with its request id, a chat turn with its turn
    id, so each lands once); a saved turn counts as an append of the tokens it stored."""

    def __init__(self, target: str, config: LongMemConfig, seed: int, max_requests: int | None = None):
        self.target, self.config, self.seed, self.max_requests = target, config, seed, max_requests
        self.logs = [ClientLog(f"soak-{seed}-{w}") for w in range(config.soak.clients)]
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(w,), daemon=True) for w in range(len(self.logs))]

    def start(self) -> "Workload":
        with LongMemClient(self.target, timeout=self.config.soak.request_timeout_s) as client:
            client.wait_ready(self.config.soak.retry_s)
            for entry in self.logs:
                resent(client.create_memory, entry.memory_id, self.config.soak.capacity_tokens,
                       self.config.serve.num_shards, done="ALREADY_EXISTS", retry_s=self.config.soak.retry_s)
        for t in self.threads:
            t.start()
        return self

    def join(self) -> None:
        """Waits until every client has sent its max_requests (or was stopped) and heard back."""
        for t in self.threads:
            t.join()

    def stop(self) -> None:
        """Stops sending new requests and waits for those in flight."""
        self.stopping.set()
        self.join()

    def acknowledged(self) -> int:
        return sum(len(entry.appended) for entry in self.logs)

    def _request(self, rpc: str, rng: random.Random, entry: ClientLog) -> Callable[[LongMemClient], None]:
        """One request, ready to be sent (and resent as it is: an append keeps its ids and request id)."""
        k = self.config.soak
        if rpc == "Append":
            ids, request_id = [rng.randint(1, 250) for _ in range(rng.randint(*k.append_tokens))], uuid.uuid4().hex

            def append(client: LongMemClient) -> None:
                client.append(entry.memory_id, token_ids=ids, request_id=request_id)
                entry.appended.append(ids)
            return append
        if rpc == "Score":
            ids = [rng.randint(1, 250) for _ in range(32)]
            return lambda client: client.score(token_ids=ids, memory_id=entry.memory_id, backbone_logprobs=False)
        query = rng.choice(k.queries)
        if rpc == "Retrieve":
            return lambda client: client.retrieve(entry.memory_id, query)

        if rpc == "Chat":
            turn_id = uuid.uuid4().hex

            def chat(client: LongMemClient) -> None:
                with client.chat(entry.memory_id, query, turn_id=turn_id, max_new_tokens=k.generate_tokens) as turn:
                    turn.text()
                if not turn.saved:
                    raise RuntimeError("a Chat stream ended without saving its turn")
                entry.appended.append(turn.turn_token_ids)
            return chat

        def generate(client: LongMemClient) -> None:
            with client.generate(query, memory_id=entry.memory_id, max_new_tokens=k.generate_tokens) as stream:
                if not list(stream)[-1].finish_reason:
                    raise RuntimeError("a Generate stream ended without a finish_reason")
        return generate

    def _run(self, w: int) -> None:
        k, entry = self.config.soak, self.logs[w]
        rng = random.Random(self.seed * 1000 + w)
        with LongMemClient(self.target, timeout=k.request_timeout_s, retry_s=k.retry_s) as client:
            sent = 0
            while not self.stopping.is_set() and (self.max_requests is None or sent < self.max_requests):
                rpc = rng.choices(SOAK_RPCS, weights=k.mix)[0]
                send, sent = self._request(rpc, rng, entry), sent + 1
                try:
                    resend(lambda: send(client), k.retry_s, lambda e: e.code.name in ALLOWED,
                           lambda e: entry.answers.update([e.code.name]))
                    entry.answers["OK"] += 1
                    entry.requests[rpc] += 1
                except LongMemError as e:
                    entry.answers[e.code.name] += 1
                    entry.failed.append(f"{rpc}: {e}")
                except Exception as e:  # a broken answer (a stream without its end) fails the request, not the client
                    entry.failed.append(f"{rpc}: {type(e).__name__}: {e}")
            for code, n in client.retried.items():
                entry.answers[code] += n


# ---- checks ---------------------------------------------------------------------------------------
@dataclass
class DataCheck:
    memories: int = 0
    appends: int = 0  # acknowledged
    tokens: int = 0  # acknowledged
    lost_tokens: int = 0  # acknowledged but not in the memory
    duplicated_tokens: int = 0  # in the memory more often than acknowledged
    counters_differ: list[str] = field(default_factory=list)  # memories whose counters differ from the replay
    retrieval_differs: list[str] = field(default_factory=list)  # (memory, query) whose spans differ

    @property
    def ok(self) -> bool:
        return not (self.lost_tokens or self.duplicated_tokens or self.counters_differ or self.retrieval_differs)


def _spans(response) -> list[tuple]:
    return [(s.start_position, s.end_position, s.text, s.hits, round(s.score, 2)) for s in response.spans]


def check_memories(target: str, config: LongMemConfig, logs: list[ClientLog]) -> DataCheck:
    """Replays each memory's acknowledged appends into a fresh memory with no fault, then compares the
    two: tokens appended, held, evicted and pending, and the spans every check query retrieves."""
    k, out = config.soak, DataCheck()
    with LongMemClient(target, timeout=k.request_timeout_s, retry_s=k.retry_s) as client:
        for entry in logs:
            replay = f"{entry.memory_id}-replay"
            resent(client.create_memory, replay, k.capacity_tokens, config.serve.num_shards, done="ALREADY_EXISTS",
                   retry_s=k.retry_s)
            for ids in entry.appended:
                client.append(replay, token_ids=ids)
            got, want = client.get_memory(entry.memory_id), client.get_memory(replay)
            out.memories += 1
            out.appends += len(entry.appended)
            out.tokens += sum(len(ids) for ids in entry.appended)
            out.lost_tokens += max(0, want.tokens_appended - got.tokens_appended)
            out.duplicated_tokens += max(0, got.tokens_appended - want.tokens_appended)
            fields = ("tokens_appended", "tokens_held", "tokens_evicted", "pending_tokens")
            if any(getattr(got, f) != getattr(want, f) for f in fields):
                out.counters_differ.append(entry.memory_id)
            for query in k.queries:
                if _spans(client.retrieve(entry.memory_id, query)) != _spans(client.retrieve(replay, query)):
                    out.retrieval_differs.append(f"{entry.memory_id}: {query!r}")
            for memory_id in (replay, entry.memory_id):
                resent(client.delete_memory, memory_id, done="NOT_FOUND", retry_s=k.retry_s)
    return out


# ---- soak -----------------------------------------------------------------------------------------
@dataclass
class SoakReport:
    minutes: float
    faults: list[tuple[float, str, str]]  # (seconds into the run, fault, what was done)
    requests: Counter  # rpc -> requests that succeeded in the end
    answers: Counter  # status code name -> answers, resent ones included
    failed: list[str]  # requests that never succeeded
    data: DataCheck
    fuzz_messages: int
    fuzz_codes: Counter
    fuzz_bad: list[tuple[str, str, str]]

    @property
    def ok(self) -> bool:
        return (self.data.ok and not self.failed and not self.fuzz_bad
                and set(self.answers) <= {"OK", *ALLOWED})

    def to_dict(self) -> dict:
        return {"minutes": self.minutes, "ok": self.ok, "faults": [{"at_s": round(t, 1), "fault": f, "done": d} for t, f, d in self.faults],
                "requests": dict(self.requests), "answers": dict(self.answers), "failed": self.failed,
                "data": {**vars(self.data), "ok": self.data.ok},
                "fuzz": {"messages": self.fuzz_messages, "codes": dict(self.fuzz_codes), "bad": self.fuzz_bad}}

    def summary(self) -> str:
        kinds = Counter(f for _, f, _ in self.faults)
        d = self.data
        lines = [
            f"soak: {self.minutes:g} min, {len(self.faults)} faults ("
            + ", ".join(f"{k} {kinds[k]}" for k in FAULTS if kinds[k]) + ")",
            f"requests that succeeded: {sum(self.requests.values())} "
            f"({', '.join(f'{rpc} {n}' for rpc, n in sorted(self.requests.items()))}); never succeeded: {len(self.failed)}",
            "answers by code (resent ones included): " + ", ".join(f"{c} {n}" for c, n in self.answers.most_common()),
            f"data: {d.memories} memories, {d.appends} acknowledged appends ({d.tokens} tokens): "
            + ("0 acknowledged appends lost, 0 duplicated" if not (d.lost_tokens or d.duplicated_tokens)
               else f"{d.lost_tokens} acknowledged tokens lost, {d.duplicated_tokens} duplicated")
            + f"; counters equal to a fault-free replay: {d.memories - len(d.counters_differ)}/{d.memories}; "
            f"retrieval identical to it: {'yes' if not d.retrieval_differs else d.retrieval_differs}",
            f"fuzz: {self.fuzz_messages} random and malformed requests: "
            + ", ".join(f"{c} {n}" for c, n in self.fuzz_codes.most_common())
            + f"; INTERNAL or UNKNOWN: {len(self.fuzz_bad)}",
            "result: " + ("PASS" if self.ok else "FAIL"),
        ]
        return "\n".join(lines) + "\n"


def soak(sim: Simulated, minutes: float, seed: int, progress: Callable[[str], None] = log.info) -> SoakReport:
    """Runs the workload on `sim` for `minutes` while random faults (soak.faults) are injected every
    soak.fault_interval_s; then checks the data and fuzzes the API."""
    import grpc

    from longmem.fuzz import fuzz

    k, rng = sim.config.soak, random.Random(seed)
    workload = Workload(sim.target, sim.config, seed).start()
    start = time.monotonic()
    end, faults = start + 60 * minutes, []
    while True:
        wait = rng.uniform(*k.fault_interval_s)
        if time.monotonic() + wait >= end:
            break
        time.sleep(wait)
        name = rng.choice(k.faults)
        faults.append((time.monotonic() - start, name, FAULTS[name](sim, rng)))
        progress(f"{faults[-1][0]:7.1f} s  {faults[-1][2]}  ({workload.acknowledged()} appends acknowledged)")
    time.sleep(max(0.0, end - time.monotonic()))
    workload.stop()
    progress("load stopped; checking every memory against a fault-free replay")
    data = check_memories(sim.target, sim.config, workload.logs)
    progress(f"fuzzing with {k.fuzz_messages} requests")
    with grpc.insecure_channel(sim.target) as channel:
        fuzzed = fuzz(channel, k.fuzz_messages, seed, timeout_s=k.request_timeout_s)
    return SoakReport(minutes, faults, sum((e.requests for e in workload.logs), Counter()),
                      sum((e.answers for e in workload.logs), Counter()), [f for e in workload.logs for f in e.failed],
                      data, fuzzed.messages, fuzzed.codes, fuzzed.bad)
