"""Tenants, API keys and input validation through the real Serve gRPC endpoint (one local cluster)."""

from __future__ import annotations

import os

import grpc
import pytest

from longmem.config import LongMemConfig
from longmem.v1 import longmem_pb2 as pb
from longmem.v1 import longmem_pb2_grpc as pbg
from services.app import local_service
from tiny import free_port, save_tiny

ALICE_KEY = "alice-key-0123456789abcdef"
BOB_KEY = "bob-key-0123456789abcdef0"
SECRET = "The vault combination is 31-41-59, known only to Alice. " * 6
PORT: dict[str, int] = {}  # the module's plaintext Serve gRPC port



@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    model = save_tiny(root / "tiny", "llama")
    keys = root / "keys.yaml"
    keys.write_text(f"alice: [{ALICE_KEY}]\nbob: [{BOB_KEY}]\n")
    port = PORT["grpc"] = free_port()
    config = LongMemConfig.from_dict({
        "backbone": {"name_or_path": str(model)}, "read": {"segment_tokens": 32},
        "memory": {"capacity_tokens": 512, "topk_tokens": 8},
        "serve": {"grpc_port": port, "num_shards": 2, "api_keys_file": str(keys), "max_new_tokens_limit": 8,
                  "max_choices": 4, "max_text_chars": 2000, "storage_uri": str(root / "storage"),
                  "gateway_max_ongoing_requests": 2, "gateway_max_queued_requests": 4},
    })
    config.serve.http_port = free_port()
    with local_service(config), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pbg.LongMemStub(channel)


def auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


ALL_CALLS = [
    ("CreateMemory", pb.CreateMemoryRequest(memory_id="m")),
    ("GetMemory", pb.GetMemoryRequest(memory_id="m")),
    ("ListMemories", pb.ListMemoriesRequest()),
    ("DeleteMemory", pb.DeleteMemoryRequest(memory_id="m")),
    ("ResetMemory", pb.ResetMemoryRequest(memory_id="m")),
    ("Append", pb.AppendRequest(memory_id="m", text="hello")),
    ("Score", pb.ScoreRequest(text="hello there")),
    ("ScoreChoices", pb.ScoreChoicesRequest(prefix="a", choices=["b"])),
    ("Retrieve", pb.RetrieveRequest(memory_id="m", text="x")),
]


@pytest.mark.parametrize("metadata", [[], auth("wrong-key-0123456789abc"), [("authorization", ALICE_KEY)]],
                         ids=["missing", "wrong", "not-bearer"])
def test_missing_or_wrong_key_is_unauthenticated(endpoint, metadata):
    for name, request in ALL_CALLS:
        with pytest.raises(grpc.RpcError) as err:
            getattr(endpoint, name)(request, metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
    with pytest.raises(grpc.RpcError) as err:
        list(endpoint.Generate(pb.GenerateRequest(prompt="hi", max_new_tokens=1), metadata=metadata))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        list(endpoint.Chat(pb.ChatRequest(session_id="m", message="hi", max_new_tokens=1), metadata=metadata))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_tenant_never_reaches_another_tenants_memory(endpoint):
    alice, bob = auth(ALICE_KEY), auth(BOB_KEY)
    endpoint.CreateMemory(pb.CreateMemoryRequest(memory_id="vault", capacity_tokens=512), metadata=alice)
    endpoint.Append(pb.AppendRequest(memory_id="vault", text=SECRET), metadata=alice)
    before = endpoint.GetMemory(pb.GetMemoryRequest(memory_id="vault"), metadata=alice)
    assert before.tokens_appended > 0

    attempts = [
        ("GetMemory", pb.GetMemoryRequest(memory_id="vault")),
        ("Append", pb.AppendRequest(memory_id="vault", text="overwrite attempt")),
        ("ResetMemory", pb.ResetMemoryRequest(memory_id="vault")),
        ("Score", pb.ScoreRequest(memory_id="vault", text="The vault combination is")),
        ("ScoreChoices", pb.ScoreChoicesRequest(memory_id="vault", prefix="The vault", choices=[" combination"])),
        ("Retrieve", pb.RetrieveRequest(memory_id="vault", text="vault combination")),
        ("DeleteMemory", pb.DeleteMemoryRequest(memory_id="vault")),
        ("GetMemory", pb.GetMemoryRequest(memory_id="alice~vault")),
        ("Retrieve", pb.RetrieveRequest(memory_id="../alice~vault", text="vault")),
    ]
    for name, request in attempts:
        with pytest.raises(grpc.RpcError) as err:
            getattr(endpoint, name)(request, metadata=bob)
        assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), name
        details = err.value.details().replace(request.memory_id, "")  # Bob's own input may be echoed
        assert "alice" not in details.lower() and "31-41-59" not in details
    with pytest.raises(grpc.RpcError) as err:
        list(endpoint.Generate(pb.GenerateRequest(memory_id="vault", prompt="The vault", max_new_tokens=2),
                               metadata=bob))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    listed = endpoint.ListMemories(pb.ListMemoriesRequest(), metadata=bob).memories
    assert all(m.memory_id != "vault" and "alice" not in m.memory_id for m in listed)
    # Bob's own "vault" is a different memory; Alice's is untouched by everything above.
    mine = endpoint.CreateMemory(pb.CreateMemoryRequest(memory_id="vault", capacity_tokens=256), metadata=bob)
    assert mine.memory_id == "vault" and mine.tokens_appended == 0
    # Chat on a session named like Alice's memory is Bob's own session: it starts empty and stays his.
    chunks = list(endpoint.Chat(pb.ChatRequest(session_id="vault", message="vault?", max_new_tokens=2, turn_id="b1"),
                                metadata=bob))
    assert chunks[0].history_tokens == 0 and not chunks[0].reread and chunks[-1].saved
    assert chunks[-1].memory.memory_id == "vault" and chunks[-1].memory.tokens_appended > 0
    after = endpoint.GetMemory(pb.GetMemoryRequest(memory_id="vault"), metadata=alice)
    assert after == before
    assert [m.memory_id for m in endpoint.ListMemories(pb.ListMemoriesRequest(), metadata=alice).memories] == ["vault"]
    endpoint.DeleteMemory(pb.DeleteMemoryRequest(memory_id="vault"), metadata=bob)
    assert endpoint.GetMemory(pb.GetMemoryRequest(memory_id="vault"), metadata=alice).tokens_appended > 0


# Random and malformed requests per run: the suite's count; `longmem soak` sends soak.fuzz_messages (1,000).
FUZZ_EXAMPLES = int(os.environ.get("LONGMEM_FUZZ_EXAMPLES", "60"))


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzzed_requests_never_get_internal_errors(endpoint, seed):
    from longmem.fuzz import fuzz

    before = endpoint.GetMemory(pb.GetMemoryRequest(memory_id="vault"), metadata=auth(ALICE_KEY))
    with grpc.insecure_channel(f"127.0.0.1:{PORT['grpc']}") as channel:
        result = fuzz(channel, FUZZ_EXAMPLES, seed, metadata=auth(ALICE_KEY), keep=["vault"])
    assert result.messages == FUZZ_EXAMPLES and not result.bad, result.bad
    assert {"INVALID_ARGUMENT", "NOT_FOUND"} <= set(result.codes), result.codes  # the gateway answered them
    assert endpoint.GetMemory(pb.GetMemoryRequest(memory_id="vault"), metadata=auth(ALICE_KEY)) == before


def test_bytes_that_are_no_request_message_are_invalid_argument(endpoint):
    with grpc.insecure_channel(f"127.0.0.1:{PORT['grpc']}") as channel:
        for method in ("Score", "Generate"):
            call = channel.unary_stream if method == "Generate" else channel.unary_unary
            send = call(f"/longmem.v1.LongMem/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as err:
                response = send(b"\x0a\x64abc", metadata=auth(ALICE_KEY), timeout=60)
                list(response) if method == "Generate" else response
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"not a valid longmem.v1.{method}Request" in err.value.details()


def self_signed(tmp_path) -> tuple[bytes, bytes]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return pem, key_pem


def test_tls_front_forwards_calls_streams_and_errors(endpoint, tmp_path):
    from longmem.client import LongMemClient, LongMemError
    from services.tls import TlsFront

    cert, key = self_signed(tmp_path)
    front = TlsFront(f"127.0.0.1:{PORT['grpc']}", 0, cert, key, host="127.0.0.1").start()
    try:
        target = f"localhost:{front.port}"
        with LongMemClient(target, api_key=ALICE_KEY, tls_root_cert=cert, timeout=60) as client:
            client.create_memory(memory_id="over-tls", capacity_tokens=256)
            client.append("over-tls", text="Encrypted on the wire. " * 4)
            assert "over-tls" in [m.memory_id for m in client.list_memories().memories]
            chunks = list(client.generate("Encrypted", memory_id="over-tls", max_new_tokens=3))
            assert sum(len(c.token_ids) for c in chunks) == 3 and chunks[-1].finish_reason == "length"
            client.delete_memory("over-tls")
        with LongMemClient(target, tls_root_cert=cert, timeout=60) as anonymous:
            with pytest.raises(LongMemError) as err:
                anonymous.list_memories()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        with LongMemClient(target, api_key=ALICE_KEY, timeout=5) as plaintext:
            with pytest.raises(LongMemError) as err:
                plaintext.list_memories()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        front.stop()


def test_bounded_load_within_capacity_has_no_errors(endpoint):
    from longmem.loadtest import run_load

    report = run_load(f"127.0.0.1:{PORT['grpc']}", clients=4, seconds=8, max_requests=60, api_key=ALICE_KEY)
    assert not report.errors, report.table()
    assert set(report.latencies) == {"Append", "Score", "Generate"}
    assert report.requests >= 4 and report.throughput > 0
    assert 0 < report.percentile("Score", 0.5) <= report.percentile("Score", 0.99)


def test_overload_is_refused_with_resource_exhausted_and_the_service_stays_up(endpoint):
    from longmem.loadtest import run_load

    report = run_load(f"127.0.0.1:{PORT['grpc']}", clients=24, seconds=8, max_requests=300, api_key=ALICE_KEY,
                      mix=(0.0, 1.0, 0.0))
    assert set(report.errors) <= {"RESOURCE_EXHAUSTED"}, report.table()
    assert report.errors["RESOURCE_EXHAUSTED"] > 0, report.table()
    assert report.latencies["Score"], "admitted requests are served"
    endpoint.ListMemories(pb.ListMemoriesRequest(), metadata=auth(ALICE_KEY))
