"""The safetensors format, streamed: one tensor in memory at a time, every byte hashed once.

The ``safetensors`` package builds the whole file in memory when it saves and needs a second
pass to hash a file it loads; a 1 GiB state_dict would cost two copies. This module reads and
writes the same format (8-byte little-endian header length, JSON header, packed data) through
plain file objects, so blobs stream and are hashed on the fly:

>>> sha256, size = write_tensors(f, [("weight", w), ("bias", b)], {"4.weight": "2.weight"})
>>> header = read_header(f)                          # validated: offsets, dtypes, lengths
>>> w = read_tensor(f, header.entries["weight"])     # reads exactly that tensor's bytes

Headers come from untrusted uploads too, so every field is checked before it is used; a bad one
raises ``InvalidArgument`` naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Mapping

import torch

from .errors import InvalidArgument, ResourceExhausted
from .limits import DEFAULT_LIMITS, Limits, brief, json_outline, loads_bounded, over

MAX_RANK = 64  # torch's own limit on tensor dimensions
MAX_HEADER_DEPTH = 3  # {"name": {"shape": [...]}}: deeper is never a safetensors header
READ_CHUNK_BYTES = 8 << 20

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a file: absolute byte offsets ``[begin, end)``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A validated header: entries in file order, the free-form string metadata, file size."""

    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    total_bytes: int


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise InvalidArgument(f"dtype {dtype} cannot be stored in safetensors; "
                              f"use one of {sorted(DTYPES)}") from None


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy when it is already a contiguous CPU tensor."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def nbytes_of(dtype: torch.dtype, shape: Iterable[int]) -> int:
    """Bytes of a tensor of ``shape``; Python ints, so a huge shape cannot overflow."""
    numel = 1
    for d in shape:
        numel *= d
    return numel * element_size(dtype)


def build_header(specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None) -> bytes:
    """The length prefix and JSON header for tensors ``(name, dtype, shape)`` in that order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in specs:
        nbytes = nbytes_of(dtype, shape)
        header[name] = {"dtype": dtype_name(dtype), "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps the data 8-byte aligned, as the spec asks
    return struct.pack("<Q", len(encoded)) + encoded


def canonical_order(names_and_dtypes: Iterable[tuple[str, torch.dtype]]) -> list[str]:
    """Widest dtype first, then by name: aligned data and one byte layout per state_dict."""
    return [name for name, dtype in
            sorted(names_and_dtypes, key=lambda nd: (-element_size(nd[1]), nd[0]))]


def write_tensors(file: BinaryIO, tensors: Iterable[tuple[str, torch.Tensor]],
                  metadata: Mapping[str, str] | None = None) -> tuple[str, int]:
    """Write a safetensors file; returns ``(sha256 hex, bytes written)``.

    The tensors are laid out in ``canonical_order`` whatever order they come in, so the same
    tensors always make the same bytes, and a state_dict written here (tied entries once, as
    the store keeps them) is already the store's blob: its upload needs no rewrite.
    """
    given = dict(tensors)
    tensors = [(name, given[name]) for name in canonical_order(
        (name, tensor.dtype) for name, tensor in given.items())]
    digest = hashlib.sha256()
    head = build_header([(n, t.dtype, tuple(t.shape)) for n, t in tensors], metadata)
    file.write(head)
    digest.update(head)
    size = len(head)
    for _, tensor in tensors:
        data = tensor_bytes(tensor)
        file.write(data)
        digest.update(data)
        size += data.nbytes
    return digest.hexdigest(), size


def read_header(file: BinaryIO, total_bytes: int | None = None,
                limits: Limits = DEFAULT_LIMITS) -> Header:
    """Parse and validate the header at the file's current position (normally 0).

    Its size (``limits.max_header_bytes``) is checked before it is read, its nesting and
    entry count (``limits.max_header_entries``) before it is parsed: a header cannot make
    the server allocate more than a few times its bounded size.
    """
    prefix = file.read(8)
    if len(prefix) != 8:
        raise InvalidArgument("not a safetensors file: shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", prefix)
    if total_bytes is not None and 8 + length > total_bytes:
        raise InvalidArgument(f"safetensors file truncated: header needs {length} bytes, "
                              f"{total_bytes - 8} present (or not safetensors)")
    if length > limits.max_header_bytes:
        raise ResourceExhausted(over("safetensors header size in bytes", length,
                                     "max_header_bytes", limits))
    raw = file.read(length)
    if len(raw) != length:
        raise InvalidArgument(f"safetensors file truncated: header needs {length} bytes, "
                              f"{len(raw)} present")
    if raw[:1] != b"{":
        raise InvalidArgument("safetensors header must be a JSON object")
    depth, items = json_outline(raw)
    if depth > MAX_HEADER_DEPTH:
        raise InvalidArgument(f"safetensors header is nested {depth} deep; a valid one is at "
                              f"most {MAX_HEADER_DEPTH} (object, entry, shape)")
    if items > limits.max_header_entries + 1:  # + __metadata__
        raise ResourceExhausted(over("safetensors header entry count", items - 1,
                                     "max_header_entries", limits))
    parsed = loads_bounded(raw, "safetensors header")
    if not isinstance(parsed, dict):
        raise InvalidArgument("safetensors header must be a JSON object")
    metadata = parsed.pop("__metadata__", None) or {}
    if len(parsed) > limits.max_header_entries:
        raise ResourceExhausted(over("safetensors header entry count", len(parsed),
                                     "max_header_entries", limits))
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InvalidArgument("safetensors __metadata__ must map strings to strings")
    data_start = 8 + length
    entries = [_parse_entry(name, spec, data_start) for name, spec in parsed.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    position = data_start
    for entry in entries:
        if entry.begin != position:
            raise InvalidArgument(f"safetensors tensor {brief(entry.name)} starts at byte "
                                  f"{entry.begin - data_start}, expected {position - data_start}:"
                                  " tensors overlap or leave a gap")
        position = entry.end
    if total_bytes is not None and position != total_bytes:
        problem = "truncated" if position > total_bytes else "has trailing bytes"
        raise InvalidArgument(f"safetensors file {problem}: header describes {position} bytes,"
                              f" the file holds {total_bytes}")
    return Header({e.name: e for e in entries}, metadata, data_start, position)


def _parse_entry(name: str, spec: object, data_start: int) -> TensorEntry:
    if not isinstance(spec, dict):
        raise InvalidArgument(f"safetensors entry {brief(name)} must be an object")
    name_of_dtype = spec.get("dtype")
    dtype = DTYPES.get(name_of_dtype) if isinstance(name_of_dtype, str) else None
    if dtype is None:
        raise InvalidArgument(f"safetensors entry {brief(name)} has unknown dtype "
                              f"{brief(name_of_dtype)}; known: {sorted(DTYPES)}")
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise InvalidArgument(f"safetensors entry {brief(name)} has an invalid shape "
                              f"{brief(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets) and offsets[0] <= offsets[1]):
        raise InvalidArgument(f"safetensors entry {brief(name)} has invalid data_offsets "
                              f"{brief(offsets)}")
    if len(shape) > MAX_RANK:
        raise InvalidArgument(f"safetensors entry {brief(name)} has {len(shape)} dimensions; "
                              f"torch takes at most {MAX_RANK}")
    needed = nbytes_of(dtype, shape)
    if needed != offsets[1] - offsets[0]:
        raise InvalidArgument(
            f"safetensors entry {brief(name)}: shape {shape} of {spec['dtype']} needs "
            f"{needed} bytes, data_offsets give {offsets[1] - offsets[0]}")
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0],
                       data_start + offsets[1])


def read_into(file: BinaryIO, target: torch.Tensor, nbytes: int, digest=None) -> None:
    """Fill the contiguous CPU tensor ``target`` from the file's current position."""
    view = memoryview(target.reshape(-1).view(torch.uint8).numpy())
    if view.nbytes != nbytes:
        raise InvalidArgument(f"expected {nbytes} bytes for a tensor of {view.nbytes}")
    read_exactly(file, view, digest)


def read_exactly(file: BinaryIO, view: memoryview, digest=None) -> None:
    """Fill ``view`` from the file's current position, in chunks; short is ``InvalidArgument``."""
    done, nbytes = 0, view.nbytes
    while done < nbytes:
        chunk = view[done:done + READ_CHUNK_BYTES]
        got = file.readinto(chunk)
        if not got:
            raise InvalidArgument(f"file truncated: {nbytes - done} bytes of a tensor missing")
        if digest is not None:
            digest.update(chunk[:got])
        done += got


def read_tensor(file: BinaryIO, entry: TensorEntry, digest=None) -> torch.Tensor:
    """Read one entry into a new tensor (seeks to it); ``digest`` is fed its bytes."""
    tensor = torch.empty(entry.shape, dtype=entry.dtype)
    file.seek(entry.begin)
    read_into(file, tensor, entry.nbytes, digest)
    return tensor
