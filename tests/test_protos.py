"""The committed stubs match the .proto files, and the public service has its contract."""

import importlib.util
from pathlib import Path

import pytest

from longmem.v1 import longmem_pb2, longmem_pb2_grpc, tensor_pb2

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMITTED = REPO_ROOT / "longmem" / "v1"

PUBLIC_RPCS = {
    "CreateMemory": ("CreateMemoryRequest", "MemoryInfo"),
    "GetMemory": ("GetMemoryRequest", "MemoryInfo"),
    "ListMemories": ("ListMemoriesRequest", "ListMemoriesResponse"),
    "DeleteMemory": ("DeleteMemoryRequest", "DeleteMemoryResponse"),
    "ResetMemory": ("ResetMemoryRequest", "MemoryInfo"),
    "Append": ("AppendRequest", "AppendResponse"),
    "Score": ("ScoreRequest", "ScoreResponse"),
    "ScoreChoices": ("ScoreChoicesRequest", "ScoreChoicesResponse"),
    "Generate": ("GenerateRequest", "GenerateResponse"),
    "Retrieve": ("RetrieveRequest", "RetrieveResponse"),
    "Chat": ("ChatRequest", "ChatResponse"),
}
STREAMING_RPCS = {"Generate", "Chat"}


def load_gen_protos():
    spec = importlib.util.spec_from_file_location(
        "gen_protos", REPO_ROOT / "scripts" / "gen_protos.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_protos(tmp_path):
    generated = load_gen_protos().generate(tmp_path)
    fresh = {p.name: p.read_bytes() for p in generated}
    committed = {p.name: p.read_bytes() for p in COMMITTED.iterdir() if p.suffix in {".py", ".pyi"}}
    assert sorted(committed) == sorted(fresh), "run: python scripts/gen_protos.py"
    stale = [name for name in fresh if committed[name] != fresh[name]]
    assert not stale, f"stale generated files {stale}; run: python scripts/gen_protos.py"


def test_service_has_the_public_rpcs():
    service = longmem_pb2.DESCRIPTOR.services_by_name["LongMem"]
    assert service.full_name == "longmem.v1.LongMem"
    assert {m.name for m in service.methods} == set(PUBLIC_RPCS)
    for method in service.methods:
        request, response = PUBLIC_RPCS[method.name]
        assert method.input_type.full_name == f"longmem.v1.{request}"
        assert method.output_type.full_name == f"longmem.v1.{response}"
        assert not method.client_streaming, method.name
        assert method.server_streaming == (method.name in STREAMING_RPCS), method.name


def test_grpc_stubs_expose_every_rpc():
    assert callable(longmem_pb2_grpc.add_LongMemServicer_to_server)
    for name in PUBLIC_RPCS:
        assert callable(getattr(longmem_pb2_grpc.LongMemServicer, name))


@pytest.mark.parametrize(
    "message, optional_fields",
    [
        ("ScoreRequest", {"use_memory"}),
        ("ScoreChoicesRequest", {"use_memory"}),
        ("GenerateRequest", {"seed", "use_memory", "reread"}),
    ],
)
def test_optional_fields_track_presence(message, optional_fields):
    fields = longmem_pb2.DESCRIPTOR.message_types_by_name[message].fields
    assert {f.name for f in fields if f.has_presence} == optional_fields


def test_tensor_message_shape():
    fields = {f.name: f for f in tensor_pb2.Tensor.DESCRIPTOR.fields}
    assert list(fields) == ["dtype", "shape", "data"]
    assert tensor_pb2.Tensor.DESCRIPTOR.full_name == "longmem.v1.Tensor"
    assert fields["shape"].is_repeated
