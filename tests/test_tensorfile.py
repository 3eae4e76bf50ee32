"""The streamed safetensors reader/writer: compatible with the safetensors library, strict on
untrusted headers."""

from __future__ import annotations

import hashlib
import io
import json
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from paramserve.registry import InvalidArgument
from paramserve.registry.tensorfile import (DTYPES, read_header, read_tensor, write_tensors)

DTYPES_TORCH_MAKES = [d for d in DTYPES.values()
                      if d not in (torch.uint16, torch.uint32, torch.uint64)]


def sample(dtype: torch.dtype, shape=(3, 4)) -> torch.Tensor:
    return (torch.arange(12).reshape(shape) % 5).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def write(tensors: dict, metadata=None) -> tuple[bytes, str, int]:
    buffer = io.BytesIO()
    sha, size = write_tensors(buffer, list(tensors.items()), metadata)
    return buffer.getvalue(), sha, size


@pytest.mark.parametrize("dtype", DTYPES_TORCH_MAKES, ids=str)
def test_every_dtype_round_trips_and_the_library_reads_it(dtype):
    tensors = {"t": sample(dtype), "scalar": sample(dtype)[0, 0], "empty": torch.empty(0,
                                                                                        dtype=dtype)}
    data, sha, size = write(tensors, {"k": "v"})
    assert sha == hashlib.sha256(data).hexdigest() and size == len(data)
    header = read_header(io.BytesIO(data), len(data))
    assert header.metadata == {"k": "v"}
    for name, tensor in tensors.items():
        assert same_bits(read_tensor(io.BytesIO(data), header.entries[name]), tensor)
    theirs = st_load(data)
    assert all(same_bits(theirs[n], t) for n, t in tensors.items())


def test_reads_what_the_safetensors_library_writes():
    tensors = {"b": torch.randn(5, 7), "a": torch.arange(10, dtype=torch.int64)}
    data = st_save(tensors)
    header = read_header(io.BytesIO(data), len(data))
    assert torch.equal(read_tensor(io.BytesIO(data), header.entries["b"]), tensors["b"])


def test_non_contiguous_tensors_are_written_by_value():
    t = torch.randn(4, 6).t()
    data, _, _ = write({"t": t})
    assert torch.equal(st_load(data)["t"], t)


def forge(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.mark.parametrize("blob, message", [
    (b"\x01\x02", "shorter than its 8-byte"),
    (struct.pack("<Q", 10**12) + b"{}", "header needs 1000000000000 bytes"),
    (forge({}, length=500), "truncated: header needs 500"),
    (struct.pack("<Q", 4) + b"{no}", "not valid JSON"),
    (forge({"t": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "unknown dtype"),
    (forge({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
     "needs 8 bytes"),
    (forge({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "invalid shape"),
    (forge({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
     "truncated"),
    (forge({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9),
     "trailing bytes"),
    (forge({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "overlap or leave a gap"),
    (forge({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
     "overlap or leave a gap"),
    (forge({"__metadata__": {"a": 1}}), "__metadata__ must map strings"),
])
def test_bad_headers_are_refused_with_a_reason(blob, message):
    with pytest.raises(InvalidArgument, match=message):
        read_header(io.BytesIO(blob), len(blob))
