"""The Python client and its CLI against an in-process fake LongMem gRPC server (no Ray, no model).

The fake servicer is a test double of the server: it implements the public service with trivial
arithmetic ("tokens" are whitespace-separated words) and records every request and its metadata, so
that what is checked is what the client puts on the wire and how it handles what comes back.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import time
from concurrent import futures

import grpc
import pytest

from longmem.client import DEFAULT_PIECE_CHARS, LongMemClient, LongMemError, split_text
from longmem.client_cli import add_client_commands
from longmem.v1 import longmem_pb2 as pb
from longmem.v1 import longmem_pb2_grpc as pb_grpc
from tiny import free_port

GENERATED = [" once", " upon", " a", " time", ",", " there", " was"]
CHAT_REPLY = ["The", " code", " is", " 4417", "."]


class FakeLongMem(pb_grpc.LongMemServicer):
    def __init__(self):
        self.memories: dict[str, pb.MemoryInfo] = {}
        self.texts: dict[str, list[str]] = {}
        self.calls: list[tuple[str, object, dict]] = []  # (method, request, metadata)
        self.not_ready_calls = 0  # ListMemories answers UNAVAILABLE this many times first
        self.api_key: str | None = None  # when set, calls need `authorization: Bearer <api_key>`
        self.chat_script: list[str] = []

    def _enter(self, method, request, context):
        metadata = dict(context.invocation_metadata())
        self.calls.append((method, request, metadata))
        if self.api_key is not None and metadata.get("authorization") != f"Bearer {self.api_key}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid API key")

    def _memory(self, memory_id, context) -> pb.MemoryInfo:
        if memory_id not in self.memories:
            context.abort(grpc.StatusCode.NOT_FOUND, f"memory '{memory_id}' not found")
        return self.memories[memory_id]

    def last(self, method):
        return [c for c in self.calls if c[0] == method][-1]

    def CreateMemory(self, request, context):
        self._enter("CreateMemory", request, context)
        memory_id = request.memory_id or f"mem-{len(self.memories) + 1}"
        if memory_id in self.memories:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"memory '{memory_id}' already exists")
        info = pb.MemoryInfo(memory_id=memory_id, capacity_tokens=request.capacity_tokens or 1000,
                             num_shards=request.num_shards or 1)
        self.memories[memory_id] = info
        self.texts[memory_id] = []
        return info

    def GetMemory(self, request, context):
        self._enter("GetMemory", request, context)
        return self._memory(request.memory_id, context)

    def ListMemories(self, request, context):
        self._enter("ListMemories", request, context)
        if self.not_ready_calls > 0:
            self.not_ready_calls -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "application is starting")
        return pb.ListMemoriesResponse(memories=list(self.memories.values()))

    def DeleteMemory(self, request, context):
        self._enter("DeleteMemory", request, context)
        deleted = self.memories.pop(request.memory_id, None) is not None
        return pb.DeleteMemoryResponse(memory_id=request.memory_id, deleted=deleted)

    def ResetMemory(self, request, context):
        self._enter("ResetMemory", request, context)
        info = self._memory(request.memory_id, context)
        info.tokens_held = info.tokens_evicted = info.tokens_appended = info.pending_tokens = 0
        self.texts[request.memory_id] = []
        return info

    def Append(self, request, context):
        self._enter("Append", request, context)
        info = self._memory(request.memory_id, context)
        if bool(request.text) == bool(request.token_ids):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "exactly one of text and token_ids must be set")
        n = len(request.text.split()) if request.text else len(request.token_ids)
        self.texts[request.memory_id].append(request.text)
        info.tokens_appended += n
        info.tokens_held = min(info.capacity_tokens, info.tokens_appended)
        info.tokens_evicted = info.tokens_appended - info.tokens_held
        return pb.AppendResponse(memory=info, tokens_appended=n)

    def Score(self, request, context):
        self._enter("Score", request, context)
        ids = [len(w) for w in request.text.split()] if request.text else list(request.token_ids)
        reads = request.use_memory if request.HasField("use_memory") else bool(request.memory_id)
        n = max(len(ids) - 1, 0)
        return pb.ScoreResponse(token_ids=ids, logprobs=[-0.5] * n, backbone_logprobs=[-1.0] * n,
                                perplexity=2.0 if reads else 3.0, backbone_perplexity=3.0, num_scored_tokens=n)

    def ScoreChoices(self, request, context):
        self._enter("ScoreChoices", request, context)
        scores = [pb.ChoiceScore(choice=c, logprob=-float(len(c)), num_tokens=1, mean_logprob=-float(len(c)))
                  for c in request.choices]
        best = max(range(len(scores)), key=lambda i: scores[i].logprob)
        return pb.ScoreChoicesResponse(choices=scores, best_index=best)

    def Generate(self, request, context):
        self._enter("Generate", request, context)
        if request.prompt == "fail":
            yield pb.GenerateResponse(text=" partial")
            context.abort(grpc.StatusCode.INTERNAL, "replica died")
        n = request.max_new_tokens or 4
        for i, text in enumerate(GENERATED[:n]):
            last = i == min(n, len(GENERATED)) - 1
            yield pb.GenerateResponse(text=text, token_ids=[i], finish_reason="length" if last else "")

    def Chat(self, request, context):
        """Replies CHAT_REPLY; `chat_script` holds what each call does first: "break" sends half the reply
        then UNAVAILABLE, "other" answers another reply; a call with nothing left answers in full."""
        self._enter("Chat", request, context)
        action = self.chat_script.pop(0) if self.chat_script else ""
        reply = ["Your", " code", " is"] if action == "other" else CHAT_REPLY
        for i, text in enumerate(reply):
            if action == "break" and i == 2:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway restarted")
            yield pb.ChatResponse(text=text, turn_id=request.turn_id if i == 0 else "")
        yield pb.ChatResponse(finish_reason="eos", saved=True, memory=pb.MemoryInfo(memory_id=request.session_id),
                              turn_token_ids=[1, 2, 3])

    def Retrieve(self, request, context):
        self._enter("Retrieve", request, context)
        self._memory(request.memory_id, context)
        words = " ".join(self.texts[request.memory_id]).split()
        spans = [pb.RetrievedSpan(start_position=i, end_position=i + 1, text=w, score=1.0 / (i + 1), hits=1)
                 for i, w in enumerate(words) if w in request.text.split()]
        return pb.RetrieveResponse(spans=spans[:request.max_spans or 8])


@pytest.fixture
def fake():
    return FakeLongMem()


@pytest.fixture
def target(fake):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_LongMemServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture
def client(target):
    with LongMemClient(target, timeout=5) as c:
        yield c


# -- the client -------------------------------------------------------------------------------------

def test_metadata_reaches_server(fake, target):
    with LongMemClient(target, api_key="sk-123", application="longmem") as c:
        c.list_memories()
        c.create_memory("m")
        "".join(chunk.text for chunk in c.generate("hi"))  # streaming calls carry it too
    for method in ("ListMemories", "CreateMemory", "Generate"):
        metadata = fake.last(method)[2]
        assert metadata["authorization"] == "Bearer sk-123"
        assert metadata["application"] == "longmem"
    with LongMemClient(target) as c:
        c.list_memories()
    metadata = fake.last("ListMemories")[2]
    assert "authorization" not in metadata and "application" not in metadata


def test_memory_lifecycle(fake, client):
    info = client.create_memory("m", capacity_tokens=500, num_shards=2)
    assert (info.memory_id, info.capacity_tokens, info.num_shards) == ("m", 500, 2)
    assert client.create_memory().memory_id == "mem-2"  # zero values left to the server
    assert fake.last("CreateMemory")[1] == pb.CreateMemoryRequest()
    assert [m.memory_id for m in client.list_memories().memories] == ["m", "mem-2"]
    client.append("m", text="a b c")
    assert client.get_memory("m").tokens_appended == 3
    assert client.reset_memory("m").tokens_appended == 0
    assert client.delete_memory("m").deleted
    assert not client.delete_memory("m").deleted


def test_optional_fields_set_only_when_given(fake, client):
    client.score(text="a b", memory_id="m")
    request = fake.last("Score")[1]
    assert not request.HasField("use_memory") and request.text == "a b" and not request.append
    client.score(token_ids=[1, 2, 3], memory_id="m", use_memory=False, append=True)
    request = fake.last("Score")[1]
    assert request.HasField("use_memory") and request.use_memory is False
    assert list(request.token_ids) == [1, 2, 3] and request.text == "" and request.append

    client.score_choices("p", ["x", "y"])
    assert not fake.last("ScoreChoices")[1].HasField("use_memory")
    client.score_choices("p", ["x", "y"], memory_id="m", use_memory=True)
    request = fake.last("ScoreChoices")[1]
    assert request.HasField("use_memory") and request.use_memory and list(request.choices) == ["x", "y"]

    client.generate_text("p", temperature=0.7, top_k=5)
    request = fake.last("Generate")[1]
    assert not request.HasField("seed") and not request.HasField("use_memory")
    assert request.top_k == 5 and request.temperature == pytest.approx(0.7)
    client.generate_text("p", seed=0, use_memory=False)  # 0 and False are values, not "unset"
    request = fake.last("Generate")[1]
    assert request.HasField("seed") and request.seed == 0
    assert request.HasField("use_memory") and request.use_memory is False


def test_text_xor_token_ids(client):
    for kwargs in ({}, {"text": "a", "token_ids": [1]}):
        with pytest.raises(ValueError):
            client.append("m", **kwargs)
        with pytest.raises(ValueError):
            client.score(**kwargs)
    with pytest.raises(TypeError):
        client.score_choices("p", "one string")


def test_split_text_cuts_before_words():
    text = "alpha beta  gamma\n\ndelta " * 40
    for piece_chars in (6, 30, 1000):
        pieces = split_text(text, piece_chars)
        assert "".join(pieces) == text and all(pieces)
        # No word is broken, and every later piece starts with the one whitespace before its word.
        assert sum(len(p.split()) for p in pieces) == len(text.split())
        assert all(p[0].isspace() and not p[1].isspace() for p in pieces[1:])
    assert all(len(p) <= 30 for p in split_text(text, 30))
    assert split_text("x" * 25, 10) == ["x" * 20, "x" * 5]  # no whitespace: cut at 2 * piece_chars
    assert split_text("", 10) == [] and DEFAULT_PIECE_CHARS >= 10_000


def test_append_with_progress_splits_at_whitespace(fake, client, capsys):
    client.create_memory("m")
    words = [f"w{i}" * (1 + i % 5) for i in range(1500)]
    text = "".join(w + (" ", "  ", "\n", " \n ")[i % 4] for i, w in enumerate(words))
    response = client.append("m", text=text, progress=True, piece_chars=500)
    pieces = list(fake.texts["m"])
    assert len(pieces) > 10 and "".join(pieces) == text
    assert max(len(p) for p in pieces) <= 500
    assert response.tokens_appended == len(words) == response.memory.tokens_appended
    assert "append m" in capsys.readouterr().err  # the progress bar

    client.append("m", text="one two three")  # without progress: one request, as given
    assert fake.texts["m"][-1] == "one two three" and len(fake.texts["m"]) == len(pieces) + 1
    response = client.append("m", token_ids=[5, 6], progress=True)
    assert response.tokens_appended == 2 and list(fake.last("Append")[1].token_ids) == [5, 6]


def test_generate_streams_in_order(fake, client):
    chunks = list(client.generate("Once", memory_id="m", max_new_tokens=5))
    assert [c.text for c in chunks] == GENERATED[:5]
    assert [list(c.token_ids) for c in chunks] == [[i] for i in range(5)]
    assert [c.finish_reason for c in chunks] == ["", "", "", "", "length"]
    assert fake.last("Generate")[1].max_new_tokens == 5
    assert client.generate_text("Once") == "".join(GENERATED[:4])


def test_error_status_becomes_longmem_error(client):
    with pytest.raises(LongMemError) as info:
        client.get_memory("nope")
    err = info.value
    assert err.code is grpc.StatusCode.NOT_FOUND and err.details == "memory 'nope' not found"
    assert str(err) == "NOT_FOUND: memory 'nope' not found"
    assert isinstance(err.__cause__, grpc.RpcError) and err.rpc_error is err.__cause__
    client.create_memory("m")
    with pytest.raises(LongMemError) as info:
        client.create_memory("m")
    assert info.value.code is grpc.StatusCode.ALREADY_EXISTS
    # An error in the middle of a stream, after some chunks arrived.
    stream = client.generate("fail")
    assert next(stream).text == " partial"
    with pytest.raises(LongMemError) as info:
        next(stream)
    assert info.value.code is grpc.StatusCode.INTERNAL and info.value.details == "replica died"


def test_closed_client_refuses_calls(target):
    with LongMemClient(target) as c:
        c.list_memories()
    with pytest.raises(ValueError):
        c.list_memories()


def test_wait_ready_times_out_without_server():
    with LongMemClient(f"127.0.0.1:{free_port()}") as c:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="not ready after 1 s.*UNAVAILABLE"):
            c.wait_ready(1.0)
        assert time.monotonic() - t0 < 3.0


def test_wait_ready_polls_until_the_app_answers(fake, client):
    fake.not_ready_calls = 3
    client.wait_ready(5.0, interval_s=0.01)
    assert [c[0] for c in fake.calls] == ["ListMemories"] * 4


def test_a_read_is_resent_while_unavailable_and_the_resent_answers_counted(fake, target):
    fake.not_ready_calls = 2
    with LongMemClient(target, timeout=5, retry_s=30) as c:
        assert c.list_memories().memories == []
        assert c.retried == {"UNAVAILABLE": 2}
    assert [call[0] for call in fake.calls] == ["ListMemories"] * 3
    fake.not_ready_calls = 1
    with LongMemClient(target, timeout=5, retry_s=0) as c:
        with pytest.raises(LongMemError) as info:
            c.list_memories()
        assert info.value.code is grpc.StatusCode.UNAVAILABLE and not c.retried


def test_a_chat_turn_broken_mid_reply_is_resent_with_its_turn_id_and_continues_where_it_was(fake, target):
    fake.chat_script = ["break"]
    with LongMemClient(target, timeout=5, retry_s=30) as c:
        stream = c.chat("s", "What is my code?", turn_id="t-1")
        pieces = list(stream)
        assert "".join(pieces) == "".join(CHAT_REPLY) and pieces[0] == "The"  # nothing shown twice
        assert stream.saved and stream.turn_id == "t-1" and stream.turn_token_ids == [1, 2, 3]
        assert c.retried == {"UNAVAILABLE": 1}
    sent = [call[1] for call in fake.calls if call[0] == "Chat"]
    assert [r.turn_id for r in sent] == ["t-1", "t-1"] and sent[0].message == sent[1].message
    fake.chat_script = ["break", "other"]  # the resend answers a reply unlike the one shown
    with LongMemClient(target, timeout=5, retry_s=30) as c:
        stream = c.chat("s", "What is my code?")
        with pytest.raises(LongMemError) as info:
            list(stream)
        assert info.value.code is grpc.StatusCode.ABORTED and not stream.saved
    ids = {call[1].turn_id for call in fake.calls if call[0] == "Chat"} - {"t-1"}
    assert len(ids) == 1 and len(ids.pop()) == 32  # a random turn id by default, the same on the resend


def test_wait_ready_stops_on_bad_credentials(fake, target):
    fake.api_key = "right"
    with LongMemClient(target, api_key="wrong") as c:
        with pytest.raises(LongMemError) as info:
            c.wait_ready(5.0)
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED and len(fake.calls) == 1


def test_tls_with_root_certificate(fake, tmp_path):
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_LongMemServicer_to_server(fake, server)
    port = server.add_secure_port("localhost:0", grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    server.start()
    try:
        cert_path = tmp_path / "root.pem"
        cert_path.write_bytes(cert_pem)
        for root in (str(cert_path), cert_pem):
            with LongMemClient(f"localhost:{port}", tls_root_cert=root, timeout=5) as c:
                assert c.create_memory(f"tls-{len(fake.memories)}").num_shards == 1
    finally:
        server.stop(None)


# -- the CLI ----------------------------------------------------------------------------------------

@pytest.fixture
def cli(target, capsys, monkeypatch):
    monkeypatch.delenv("LONGMEM_TARGET", raising=False)
    monkeypatch.delenv("LONGMEM_API_KEY", raising=False)
    monkeypatch.delenv("LONGMEM_APPLICATION", raising=False)
    parser = argparse.ArgumentParser(prog="longmem")
    add_client_commands(parser.add_subparsers(dest="command", required=True))

    def run(*argv, target_arg=True):
        args = parser.parse_args([*argv, *(["--target", target] if target_arg else [])])
        rc = args.func(args)
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def test_cli_memory_commands(fake, cli):
    rc, out, err = cli("memory", "create", "--id", "m1", "--capacity", "500", "--shards", "2")
    assert rc == 0 and out == ("created memory 'm1': 0 tokens held of 500 (2 shards), 0 evicted, "
                               "0 pending, 0 appended\n")
    rc, out, _ = cli("memory", "create", "--json")
    assert rc == 0 and json.loads(out) == {
        "memory_id": "mem-2", "capacity_tokens": 1000, "num_shards": 1, "tokens_held": 0,
        "tokens_evicted": 0, "tokens_appended": 0, "pending_tokens": 0}
    rc, out, _ = cli("memory", "list")
    assert rc == 0 and [line.split(":")[0] for line in out.splitlines()] == ["memory 'm1'", "memory 'mem-2'"]
    rc, out, _ = cli("memory", "list", "--json")
    assert [m["memory_id"] for m in json.loads(out)["memories"]] == ["m1", "mem-2"]
    rc, out, _ = cli("memory", "get", "m1")
    assert rc == 0 and out.startswith("memory 'm1': 0 tokens held of 500 (2 shards)")
    rc, out, _ = cli("memory", "reset", "m1")
    assert rc == 0 and out.startswith("reset memory 'm1'")
    rc, out, _ = cli("memory", "delete", "m1")
    assert (rc, out) == (0, "deleted memory 'm1'\n")
    rc, out, _ = cli("memory", "delete", "m1", "--json")
    assert rc == 0 and json.loads(out) == {"memory_id": "m1", "deleted": False}


def test_cli_error_exit_code(cli):
    rc, out, err = cli("memory", "get", "nope")
    assert rc == 2 and out == "" and err == "error: NOT_FOUND: memory 'nope' not found\n"
    rc, _, err = cli("append", "nope", "--text", "a b")
    assert rc == 2 and err.splitlines()[-1] == "error: NOT_FOUND: memory 'nope' not found"
    rc, _, err = cli("memory", "list", "--target", f"127.0.0.1:{free_port()}", "--timeout", "1", target_arg=False)
    assert rc == 2 and err.startswith("error: UNAVAILABLE")


def test_cli_append_sources(fake, cli, tmp_path, monkeypatch):
    cli("memory", "create", "--id", "m")
    rc, out, err = cli("append", "m", "--text", "one two three", "--piece-chars", "4")
    assert rc == 0 and out.startswith("appended 3 tokens (13 characters); memory 'm': 3 tokens held")
    assert fake.texts["m"] == ["one", " two", " three"] and "append m" in err
    path = tmp_path / "doc.txt"
    path.write_text("four five\n", encoding="utf-8")
    rc, out, _ = cli("append", "m", "--file", str(path), "--json", "--no-progress")
    assert rc == 0 and json.loads(out)["tokens_appended"] == 2 and fake.texts["m"][-1] == "four five\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("six seven eight nine"))
    rc, out, _ = cli("append", "m")
    assert rc == 0 and out.startswith("appended 4 tokens") and fake.texts["m"][-1] == "six seven eight nine"
    rc, _, err = cli("append", "m", "--file", str(tmp_path / "missing.txt"))
    assert rc == 2 and err.startswith("error: ")


def test_cli_score_and_choices(fake, cli):
    rc, out, _ = cli("score", "--memory", "m", "--text", "a bb ccc")
    assert rc == 0 and out == "perplexity: 2.0000\nbackbone perplexity: 3.0000\nscored tokens: 2\n"
    assert not fake.last("Score")[1].HasField("use_memory")
    rc, out, _ = cli("score", "--memory", "m", "--no-memory", "--append", "--text", "a bb ccc", "--json")
    request = fake.last("Score")[1]
    assert request.HasField("use_memory") and not request.use_memory and request.append
    data = json.loads(out)
    assert rc == 0 and data["perplexity"] == 3.0 and data["token_ids"] == [1, 2, 3] and data["num_scored_tokens"] == 2
    rc, out, _ = cli("score-choices", "--prefix", "The answer is", "--choice", " yes", "--choice", " no")
    assert rc == 0 and out.splitlines() == [
        "  [0] logprob=-4.0000 mean=-4.0000 tokens=1 ' yes'",
        "* [1] logprob=-3.0000 mean=-3.0000 tokens=1 ' no'"]
    rc, out, _ = cli("score-choices", "--prefix", "p", "--choice", "a", "--json")
    assert json.loads(out)["choices"][0]["choice"] == "a"


def test_cli_generate_streams(fake, cli):
    rc, out, _ = cli("generate", "--prompt", "Once", "--memory", "m", "--max-new-tokens", "3", "--seed", "7",
                     "--temperature", "0.5", "--top-k", "2")
    assert rc == 0 and out == " once upon a\n"
    request = fake.last("Generate")[1]
    assert (request.memory_id, request.max_new_tokens, request.seed, request.top_k) == ("m", 3, 7, 2)
    assert not request.HasField("use_memory")
    rc, out, _ = cli("generate", "--prompt", "Once", "--json")
    chunks = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and [c["text"] for c in chunks] == GENERATED[:4] and chunks[-1]["finish_reason"] == "length"
    assert not fake.last("Generate")[1].HasField("seed")
    rc, out, err = cli("generate", "--prompt", "fail")
    assert rc == 2 and out == " partial" and err == "error: INTERNAL: replica died\n"


def test_cli_retrieve_and_env(fake, cli, target, monkeypatch):
    cli("memory", "create", "--id", "m")
    cli("append", "m", "--text", "red green blue", "--no-progress")
    rc, out, _ = cli("retrieve", "m", "--text", "green blue", "--max-spans", "5")
    assert rc == 0 and out.splitlines() == ["tokens 1-2 score=0.500 hits=1: 'green'",
                                            "tokens 2-3 score=0.333 hits=1: 'blue'"]
    rc, out, _ = cli("retrieve", "m", "--text", "green", "--json")
    assert json.loads(out) == {"spans": [{"start_position": 1, "end_position": 2, "text": "green",
                                          "score": 0.5, "hits": 1, "token_ids": []}], "reread": []}
    monkeypatch.setenv("LONGMEM_TARGET", target)
    monkeypatch.setenv("LONGMEM_API_KEY", "env-key")
    rc, out, _ = cli("memory", "list", target_arg=False)
    assert rc == 0 and out.startswith("memory 'm'")
    assert fake.last("ListMemories")[2]["authorization"] == "Bearer env-key"
