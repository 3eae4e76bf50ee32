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

import functools
import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from .errors import DataLoss, InvalidArgument, ResourceExhausted
from .limits import DEFAULT_LIMITS, Limits, brief, json_outline, loads_bounded, over

if TYPE_CHECKING:
    import torch

MAX_RANK = 64  # torch's own limit on tensor dimensions
MAX_HEADER_DEPTH = 3  # {"name": {"shape": [...]}}: deeper is never a safetensors header
READ_CHUNK_BYTES = 8 << 20
# A blob the store wrote was bounded when it was uploaded, perhaps under larger limits than
# today's: its header is read with the format's own bounds, and anything wrong is DataLoss.
STORED_BLOB_LIMITS = Limits(max_header_entries=1 << 24, max_header_bytes=100_000_000)

# The format's dtypes by name: bytes per element and the torch dtype's attribute name. The
# header is parsed from these alone, so reading a file needs no torch (the lean client reads
# downloads with numpy); ``DTYPES`` (name → torch.dtype) is built on first use.
DTYPE_INFO: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "U16": (2, "uint16"),
    "U32": (4, "uint32"),
    "U64": (8, "uint64"),
    "BOOL": (1, "bool"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
}
ITEMSIZE: dict[str, int] = {name: size for name, (size, _) in DTYPE_INFO.items()}
_torch_tables: tuple[dict, dict] | None = None


def _tables() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    global _torch_tables
    if _torch_tables is None:
        import torch

        dtypes = {name: getattr(torch, attr) for name, (_, attr) in DTYPE_INFO.items()}
        _torch_tables = dtypes, {v: k for k, v in dtypes.items()}
    return _torch_tables


def __getattr__(name: str):
    """``DTYPES`` (name → torch.dtype) and ``DTYPE_NAMES`` (the reverse), made on first use."""
    if name == "DTYPES":
        return _tables()[0]
    if name == "DTYPE_NAMES":
        return _tables()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a file: absolute byte offsets ``[begin, end)``."""

    name: str
    dtype_name: str  # the format's name: "F32", "BF16", ...
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def dtype(self) -> torch.dtype:
        return _tables()[0][self.dtype_name]


@dataclass(frozen=True)
class Header:
    """A validated header: entries in file order, the free-form string metadata, file size."""

    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    total_bytes: int


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _tables()[1][dtype]
    except KeyError:
        raise InvalidArgument(
            f"dtype {dtype} cannot be stored in safetensors; use one of {sorted(DTYPE_INFO)}"
        ) from None


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy when it is already a contiguous CPU tensor."""
    import torch

    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    return tensor.reshape(-1).view(torch.uint8).numpy().data


def element_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def nbytes_of(dtype: torch.dtype | str, shape: Iterable[int]) -> int:
    """Bytes of a tensor of ``shape`` (a torch dtype or the format's name); Python ints, so a
    huge shape cannot overflow."""
    numel = 1
    for d in shape:
        numel *= d
    return numel * (ITEMSIZE[dtype] if isinstance(dtype, str) else dtype.itemsize)


def _name_of(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else dtype_name(dtype)


def build_header(
    specs: Iterable[tuple[str, torch.dtype | str, tuple[int, ...]]],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """The length prefix and JSON header for tensors ``(name, dtype, shape)`` in that order
    (a torch dtype or the format's name)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in specs:
        nbytes = nbytes_of(dtype, shape)
        header[name] = {
            "dtype": _name_of(dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps the data 8-byte aligned, as the spec asks
    return struct.pack("<Q", len(encoded)) + encoded


def canonical_order(names_and_dtypes: Iterable[tuple[str, torch.dtype | str]]) -> list[str]:
    """Widest dtype first, then by name: aligned data and one byte layout per state_dict."""
    return [
        name
        for name, dtype in sorted(
            names_and_dtypes, key=lambda nd: (-ITEMSIZE[_name_of(nd[1])], nd[0])
        )
    ]


RawTensor = tuple[str, str, tuple[int, ...], "Callable[[], memoryview]"]


def write_raw(
    file: BinaryIO, tensors: Iterable[RawTensor], metadata: Mapping[str, str] | None = None
) -> tuple[str, int]:
    """Write a safetensors file of ``(name, dtype name, shape, bytes())`` tensors, in
    ``canonical_order``; returns ``(sha256 hex, bytes written)``. Each tensor's bytes are
    asked for when it is written (one copy off a GPU at a time); no torch needed."""
    given = {t[0]: t for t in tensors}
    tensors = [given[name] for name in canonical_order((n, t[1]) for n, t in given.items())]
    digest = hashlib.sha256()
    head = build_header([(n, dtype, shape) for n, dtype, shape, _ in tensors], metadata)
    file.write(head)
    digest.update(head)
    size = len(head)
    for name, dtype, shape, get_bytes in tensors:
        data = memoryview(get_bytes()).cast("B")
        if data.nbytes != nbytes_of(dtype, shape):
            raise InvalidArgument(
                f"tensor {brief(name)}: {data.nbytes} bytes do not make shape "
                f"{list(shape)} of {dtype}"
            )
        file.write(data)
        digest.update(data)
        size += data.nbytes
    return digest.hexdigest(), size


def write_tensors(
    file: BinaryIO,
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[str, int]:
    """Write a safetensors file of torch tensors; returns ``(sha256 hex, bytes written)``.

    The tensors are laid out in ``canonical_order`` whatever order they come in, so the same
    tensors always make the same bytes, and a state_dict written here (tied entries once, as
    the store keeps them) is already the store's blob: its upload needs no rewrite.
    """
    return write_raw(
        file,
        [
            (name, dtype_name(t.dtype), tuple(t.shape), functools.partial(tensor_bytes, t))
            for name, t in tensors
        ],
        metadata,
    )


def read_header(
    file: BinaryIO, total_bytes: int | None = None, limits: Limits = DEFAULT_LIMITS
) -> Header:
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
        raise InvalidArgument(
            f"safetensors file truncated: header needs {length} bytes, "
            f"{total_bytes - 8} present (or not safetensors)"
        )
    if length > limits.max_header_bytes:
        raise ResourceExhausted(
            over("safetensors header size in bytes", length, "max_header_bytes", limits)
        )
    raw = file.read(length)
    if len(raw) != length:
        raise InvalidArgument(
            f"safetensors file truncated: header needs {length} bytes, {len(raw)} present"
        )
    if raw[:1] != b"{":
        raise InvalidArgument("safetensors header must be a JSON object")
    depth, items = json_outline(raw)
    if depth > MAX_HEADER_DEPTH:
        raise InvalidArgument(
            f"safetensors header is nested {depth} deep; a valid one is at "
            f"most {MAX_HEADER_DEPTH} (object, entry, shape)"
        )
    if items > limits.max_header_entries + 1:  # + __metadata__
        raise ResourceExhausted(
            over("safetensors header entry count", items - 1, "max_header_entries", limits)
        )
    parsed = loads_bounded(raw, "safetensors header")
    if not isinstance(parsed, dict):
        raise InvalidArgument("safetensors header must be a JSON object")
    metadata = parsed.pop("__metadata__", None) or {}
    if len(parsed) > limits.max_header_entries:
        raise ResourceExhausted(
            over("safetensors header entry count", len(parsed), "max_header_entries", limits)
        )
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidArgument("safetensors __metadata__ must map strings to strings")
    data_start = 8 + length
    entries = [_parse_entry(name, spec, data_start) for name, spec in parsed.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    position = data_start
    for entry in entries:
        if entry.begin != position:
            raise InvalidArgument(
                f"safetensors tensor {brief(entry.name)} starts at byte "
                f"{entry.begin - data_start}, expected {position - data_start}:"
                " tensors overlap or leave a gap"
            )
        position = entry.end
    if total_bytes is not None and position != total_bytes:
        problem = "truncated" if position > total_bytes else "has trailing bytes"
        raise InvalidArgument(
            f"safetensors file {problem}: header describes {position} bytes,"
            f" the file holds {total_bytes}"
        )
    return Header({e.name: e for e in entries}, metadata, data_start, position)


def _parse_entry(name: str, spec: object, data_start: int) -> TensorEntry:
    if not isinstance(spec, dict):
        raise InvalidArgument(f"safetensors entry {brief(name)} must be an object")
    dtype = spec.get("dtype")
    if not (isinstance(dtype, str) and dtype in ITEMSIZE):
        raise InvalidArgument(
            f"safetensors entry {brief(name)} has unknown dtype "
            f"{brief(dtype)}; known: {sorted(ITEMSIZE)}"
        )
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise InvalidArgument(
            f"safetensors entry {brief(name)} has an invalid shape {brief(shape)}"
        )
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise InvalidArgument(
            f"safetensors entry {brief(name)} has invalid data_offsets {brief(offsets)}"
        )
    if len(shape) > MAX_RANK:
        raise InvalidArgument(
            f"safetensors entry {brief(name)} has {len(shape)} dimensions; "
            f"torch takes at most {MAX_RANK}"
        )
    needed = nbytes_of(dtype, shape)
    if needed != offsets[1] - offsets[0]:
        raise InvalidArgument(
            f"safetensors entry {brief(name)}: shape {shape} of {spec['dtype']} needs "
            f"{needed} bytes, data_offsets give {offsets[1] - offsets[0]}"
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def read_into(file: BinaryIO, target: torch.Tensor, nbytes: int, digest=None) -> None:
    """Fill the contiguous CPU tensor ``target`` from the file's current position."""
    import torch

    view = target.reshape(-1).view(torch.uint8).numpy().data
    if view.nbytes != nbytes:
        raise InvalidArgument(f"expected {nbytes} bytes for a tensor of {view.nbytes}")
    read_exactly(file, view, digest)


def read_exactly(file: BinaryIO, view: memoryview, digest=None) -> None:
    """Fill ``view`` from the file's current position, in chunks; short is ``InvalidArgument``."""
    done, nbytes = 0, view.nbytes
    while done < nbytes:
        chunk = view[done : done + READ_CHUNK_BYTES]
        got = file.readinto(chunk)  # type: ignore[attr-defined]  # BinaryIO's stub lacks it
        if not got:
            raise InvalidArgument(f"file truncated: {nbytes - done} bytes of a tensor missing")
        if digest is not None:
            digest.update(chunk[:got])
        done += got


def read_tensor(file: BinaryIO, entry: TensorEntry, digest=None) -> torch.Tensor:
    """Read one entry into a new tensor (seeks to it); ``digest`` is fed its bytes."""
    import torch

    tensor = torch.empty(entry.shape, dtype=entry.dtype)
    file.seek(entry.begin)
    read_into(file, tensor, entry.nbytes, digest)
    return tensor


@contextmanager
def stored_blob(path) -> Iterator[None]:
    """Errors of the format while reading a blob the store wrote are ``DataLoss`` naming it
    (the same errors in an upload are the client's: ``InvalidArgument``)."""
    try:
        yield
    except (InvalidArgument, ResourceExhausted) as err:
        raise DataLoss(
            f"blob {path} is damaged: {str(err).splitlines()[0][:200]}; restore it "
            "from a backup or delete the version that refers to it"
        ) from err


def read_stored_header(file: BinaryIO, size_bytes: int) -> Header:
    """The header of a stored blob (call inside ``stored_blob``)."""
    return read_header(file, size_bytes, limits=STORED_BLOB_LIMITS)
