"""Conversion between numpy arrays / torch tensors and the ``longmem.v1.Tensor`` message.

A Tensor carries a dtype name, a shape and the elements as little-endian, row-major bytes.
bfloat16 has no numpy dtype: it travels as raw 2-byte words (the upper half of the float32 bit
pattern). ``tensor_from_proto`` restores it as ``torch.bfloat16``; ``from_tensor_proto`` widens it
to float32, which is exact.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from longmem.v1 import tensor_pb2

BFLOAT16 = "bfloat16"

_NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    BFLOAT16: np.dtype("<u2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "bool": np.dtype("?"),
}

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    BFLOAT16: torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
_TORCH_NAMES = {dtype: name for name, dtype in _TORCH_DTYPES.items()}

SUPPORTED_DTYPES = tuple(_NUMPY_DTYPES)


def to_tensor_proto(x: np.ndarray | torch.Tensor) -> tensor_pb2.Tensor:
    """Serialise a numpy array or torch tensor (any device, any strides) into a Tensor message."""
    if isinstance(x, torch.Tensor):
        name = _TORCH_NAMES.get(x.dtype)
        if name is None:
            raise ValueError(
                f"unsupported torch dtype {x.dtype}; expected one of {', '.join(SUPPORTED_DTYPES)}"
            )
        x = x.detach().cpu()
        array = x.view(torch.int16).numpy().view(np.uint16) if name == BFLOAT16 else x.numpy()
        return _encode(name, array)
    if isinstance(x, np.ndarray):
        name = x.dtype.name
        if name not in _NUMPY_DTYPES or name == BFLOAT16:
            numpy_names = [n for n in SUPPORTED_DTYPES if n != BFLOAT16]
            raise ValueError(
                f"unsupported numpy dtype {x.dtype}; expected one of {', '.join(numpy_names)}"
            )
        return _encode(name, x)
    raise TypeError(f"expected a numpy array or torch tensor, got {type(x).__name__}")


def from_tensor_proto(t: tensor_pb2.Tensor) -> np.ndarray:
    """Deserialise a Tensor message into a new, writable numpy array.

    bfloat16 comes back as float32 (numpy has no bfloat16; the widening is exact).
    """
    array = _native_copy(t)
    if t.dtype == BFLOAT16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


def tensor_from_proto(t: tensor_pb2.Tensor) -> torch.Tensor:
    """Deserialise a Tensor message into a new CPU torch tensor of the message's dtype."""
    array = _native_copy(t)
    if t.dtype == BFLOAT16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _encode(name: str, array: np.ndarray) -> tensor_pb2.Tensor:
    data = np.ascontiguousarray(array, dtype=_NUMPY_DTYPES[name]).tobytes()
    return tensor_pb2.Tensor(dtype=name, shape=array.shape, data=data)


def _native_copy(t: tensor_pb2.Tensor) -> np.ndarray:
    """The message's elements as a new array in native byte order, after checking its size.

    bfloat16 elements are returned as their uint16 bit patterns.
    """
    if t.dtype not in _NUMPY_DTYPES:
        raise ValueError(
            f"unsupported Tensor dtype {t.dtype!r}; expected one of {', '.join(SUPPORTED_DTYPES)}"
        )
    shape = tuple(t.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"Tensor shape {list(shape)} has a negative dimension")
    wire_dtype = _NUMPY_DTYPES[t.dtype]
    expected = math.prod(shape) * wire_dtype.itemsize
    if expected != len(t.data):
        raise ValueError(
            f"Tensor data has {len(t.data)} bytes, but shape {list(shape)} of {t.dtype} "
            f"({wire_dtype.itemsize} bytes each) needs {expected}"
        )
    wire = np.frombuffer(t.data, dtype=wire_dtype).reshape(shape)
    return wire.astype(wire_dtype.newbyteorder("="))
