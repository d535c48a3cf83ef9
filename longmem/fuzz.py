"""Random and malformed requests for the public API: a seeded generator of LongMem messages with
out-of-range, empty, oversized and hostile fields, and undecodable bytes. The gateway must answer every
one with a clear status (never INTERNAL or UNKNOWN) and stay up (tests/test_security.py, `longmem soak`)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from .v1 import longmem_pb2 as pb

SERVICE = "/longmem.v1.LongMem/"
STREAMING = ("Generate", "Chat")  # server-streaming methods
BAD_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
MALFORMED_SHARE = 0.1  # of the messages: raw bytes that are no valid protobuf of the method's request
MEMORY_IDS = ["", "fuzz", "missing", "bad id", "x" * 200, "a~b", "../etc"]


def _text(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return ""
    if kind == 1:  # longer than one segment of any configuration used here
        return "".join(rng.choice("ab c\n.") for _ in range(rng.randint(2100, 2200)))
    alphabet = "abc XYZ 09.,\n\t\u00e9\u4e2d\U0001f600\x00\ud7ff"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))


def _memory_id(rng: random.Random) -> str:
    return rng.choice(MEMORY_IDS) if rng.random() < 0.7 else _text(rng)[:20]


def _ids(rng: random.Random) -> list[int]:
    return [rng.choice([rng.randint(-2**31, 2**31 - 1), rng.randint(0, 400)]) for _ in range(rng.randint(0, 20))]


def random_request(rng: random.Random) -> tuple[str, object]:
    """(method name, request message) with random, often invalid, field values."""
    method = rng.choice(["CreateMemory", "GetMemory", "Append", "Score", "ScoreChoices", "Retrieve", "Generate", "Chat"])
    m = _memory_id(rng)
    if method == "CreateMemory":
        return method, pb.CreateMemoryRequest(memory_id=m, capacity_tokens=rng.randint(-10, 10**9),
                                              num_shards=rng.randint(-3, 5))
    if method == "GetMemory":
        return method, pb.GetMemoryRequest(memory_id=m)
    if method == "Append":
        return method, pb.AppendRequest(memory_id=m, text=_text(rng), token_ids=_ids(rng),
                                        request_id=rng.choice(["", "r", "x" * 129, _text(rng)[:40]]))
    if method == "Score":
        return method, pb.ScoreRequest(memory_id=m, text=_text(rng), token_ids=_ids(rng), append=rng.random() < 0.5)
    if method == "ScoreChoices":
        return method, pb.ScoreChoicesRequest(memory_id=m, prefix=_text(rng),
                                              choices=[_text(rng) for _ in range(rng.randint(0, 6))])
    if method == "Retrieve":
        return method, pb.RetrieveRequest(memory_id=m, text=_text(rng), max_spans=rng.randint(-5, 10**6))
    if method == "Chat":
        return method, pb.ChatRequest(session_id=m, message=_text(rng), max_new_tokens=rng.randint(-5, 12),
                                      temperature=rng.uniform(-1, 3), top_k=rng.randint(-2, 50),
                                      turn_id=rng.choice(["", "t", "x" * 129, _text(rng)[:40]]))
    return method, pb.GenerateRequest(memory_id=m, prompt=_text(rng), max_new_tokens=rng.randint(-5, 12),
                                      temperature=rng.uniform(-1, 3), top_k=rng.randint(-2, 50))


def malformed_bytes(rng: random.Random) -> bytes:
    """Bytes that do not parse as a protobuf message (a truncated varint, a bad wire type...)."""
    return rng.choice([b"\xff" * rng.randint(1, 12), b"\x08", b"\x0a\x64abc", b"\x07\x01",
                       bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))])


@dataclass
class FuzzResult:
    codes: Counter = field(default_factory=Counter)  # status code name -> count
    bad: list[tuple[str, str, str]] = field(default_factory=list)  # (method, code, details) of INTERNAL/UNKNOWN

    @property
    def messages(self) -> int:
        return sum(self.codes.values())


def fuzz(channel: grpc.Channel, count: int, seed: int, metadata: Sequence[tuple[str, str]] = (),
         timeout_s: float = 60.0, keep: Sequence[str] = ()) -> FuzzResult:
    """Sends `count` random (and about MALFORMED_SHARE malformed) requests; then deletes the memories
    they created (all but `keep`)."""
    rng = random.Random(seed)
    identity = lambda b: b  # noqa: E731  (raw bytes in and out)
    result = FuzzResult()
    for _ in range(count):
        method, request = random_request(rng)
        call = channel.unary_stream if method in STREAMING else channel.unary_unary
        malformed = rng.random() < MALFORMED_SHARE
        send = call(SERVICE + method, request_serializer=identity if malformed else type(request).SerializeToString,
                    response_deserializer=identity)
        payload = malformed_bytes(rng) if malformed else request
        try:
            response = send(payload, metadata=metadata, timeout=timeout_s)
            if method in STREAMING:
                list(response)
            result.codes["OK"] += 1
        except grpc.RpcError as e:
            result.codes[e.code().name] += 1
            if e.code() in BAD_CODES:
                result.bad.append((method, e.code().name, e.details()))
    list_memories = channel.unary_unary(SERVICE + "ListMemories", request_serializer=pb.ListMemoriesRequest.SerializeToString,
                                        response_deserializer=pb.ListMemoriesResponse.FromString)
    delete = channel.unary_unary(SERVICE + "DeleteMemory", request_serializer=pb.DeleteMemoryRequest.SerializeToString,
                                 response_deserializer=pb.DeleteMemoryResponse.FromString)
    for m in list_memories(pb.ListMemoriesRequest(), metadata=metadata, timeout=timeout_s).memories:
        if m.memory_id not in keep:
            delete(pb.DeleteMemoryRequest(memory_id=m.memory_id), metadata=metadata, timeout=timeout_s)
    return result
