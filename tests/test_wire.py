"""Round trips between numpy / torch and the longmem.v1.Tensor message."""

import numpy as np
import pytest
import torch

from longmem.v1 import tensor_pb2
from longmem.wire import from_tensor_proto, tensor_from_proto, to_tensor_proto

NUMPY_DTYPES = ["float32", "float16", "int64", "int32", "bool"]
TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
SHAPES = [(2, 3, 4), (0,), (3, 0, 2), ()]


def sample_array(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    if dtype == "bool":
        values = rng.random(shape) < 0.5
    elif dtype.startswith("int"):
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    else:
        values = rng.standard_normal(shape) * 100
    return np.asarray(values, dtype=dtype)


def sample_tensor(dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(sample_array("float32", shape)).to(torch.bfloat16)
    return torch.from_numpy(sample_array(dtype, shape))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_round_trip(dtype, shape):
    x = sample_array(dtype, shape)
    proto = tensor_pb2.Tensor.FromString(to_tensor_proto(x).SerializeToString())
    assert proto.dtype == dtype
    assert tuple(proto.shape) == shape

    back = from_tensor_proto(proto)
    assert back.dtype == x.dtype
    assert back.shape == shape
    assert back.flags.writeable
    np.testing.assert_array_equal(back, x)

    as_torch = tensor_from_proto(proto)
    assert as_torch.dtype == TORCH_DTYPES[dtype]
    np.testing.assert_array_equal(as_torch.numpy(), x)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
def test_torch_round_trip(dtype, shape):
    x = sample_tensor(dtype, shape)
    proto = tensor_pb2.Tensor.FromString(to_tensor_proto(x).SerializeToString())
    assert proto.dtype == dtype
    assert tuple(proto.shape) == shape

    back = tensor_from_proto(proto)
    assert back.dtype == x.dtype
    assert back.shape == x.shape
    assert torch.equal(back, x)


def test_bfloat16_is_raw_words_and_widens_exactly_to_numpy():
    x = torch.tensor([1.0, -2.5, 3.140625, 0.0], dtype=torch.bfloat16)
    proto = to_tensor_proto(x)
    assert len(proto.data) == 2 * x.numel()
    assert proto.data == x.view(torch.int16).numpy().astype("<i2").tobytes()

    widened = from_tensor_proto(proto)
    assert widened.dtype == np.float32
    np.testing.assert_array_equal(widened, x.float().numpy())


def test_non_contiguous_and_grad_inputs():
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4).t().requires_grad_()
    assert torch.equal(tensor_from_proto(to_tensor_proto(x)), x.detach())

    y = np.arange(24, dtype=np.int32).reshape(2, 3, 4)[:, ::2, 1:]
    np.testing.assert_array_equal(from_tensor_proto(to_tensor_proto(y)), y)


def test_data_is_little_endian():
    x = np.array([1, 256], dtype=">i4")
    proto = to_tensor_proto(x)
    assert proto.data == np.array([1, 256], dtype="<i4").tobytes()
    np.testing.assert_array_equal(from_tensor_proto(proto), x)


def test_size_mismatch_is_a_clear_value_error():
    proto = to_tensor_proto(np.zeros((2, 3), dtype=np.float32))
    proto.data = proto.data[:-4]
    with pytest.raises(ValueError, match=r"20 bytes.*shape \[2, 3\] of float32.*needs 24"):
        from_tensor_proto(proto)
    with pytest.raises(ValueError, match="needs 24"):
        tensor_from_proto(proto)


def test_negative_dimension_is_rejected():
    proto = tensor_pb2.Tensor(dtype="int32", shape=[-1], data=b"")
    with pytest.raises(ValueError, match="negative"):
        from_tensor_proto(proto)


def test_unsupported_dtypes_are_rejected():
    with pytest.raises(ValueError, match="unsupported numpy dtype float64"):
        to_tensor_proto(np.zeros(2))
    with pytest.raises(ValueError, match="unsupported torch dtype torch.float64"):
        to_tensor_proto(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="unsupported Tensor dtype 'complex64'"):
        from_tensor_proto(tensor_pb2.Tensor(dtype="complex64", shape=[1], data=bytes(8)))
    with pytest.raises(TypeError, match="list"):
        to_tensor_proto([1.0, 2.0])
