"""Triton's system shared memory extension: clients on the same host register POSIX shared
memory objects (``shm_open`` names, /dev/shm/<key>) as named regions, then pass inputs and take
outputs through them instead of inside the gRPC message.

Reads and writes go through ``os.pread``/``os.pwrite`` on the descriptor opened at register
time, not through an ``mmap``: a client that truncates its object makes a mapped access die
with SIGBUS (the whole server), even between a size check and the copy, while ``pread`` just
returns fewer bytes. The object's size is still checked (``fstat``) before each access so the
error names what happened. The descriptor keeps an object the client unlinks readable, as a
mapping would (POSIX). An input is copied out of its region once and then placed in the
request's ``raw_input_contents`` (the codec's one way in); an output is copied from the
response into its region. What shared memory saves is the gRPC message: its serialization,
the socket and the message size limit.

``SharedMemoryRegions`` is the one owner of the registered regions; the inference core calls
``read_inputs`` before decoding a request and ``write_outputs`` after encoding its response.
"""

from __future__ import annotations

import math
import os
import stat
import threading
from dataclasses import dataclass

from paramserve.protos import inference_pb2 as pb
from paramserve.registry.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from paramserve.registry.tensorfile import ITEMSIZE

from .wire import SAFETENSORS_OF

SHM_DIR = "/dev/shm"  # where glibc's shm_open puts its objects
MAX_NAME_CHARS = 256
MAX_KEY_CHARS = 255  # NAME_MAX: the longest file name under /dev/shm
REGION, BYTE_SIZE, OFFSET = (
    "shared_memory_region",
    "shared_memory_byte_size",
    "shared_memory_offset",
)


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int

    def check_size(self) -> None:
        """The object still holds the whole region (a client may truncate it any time)."""
        try:
            size = os.fstat(self.fd).st_size
        except OSError as err:
            raise FailedPrecondition(
                f"shared memory region {self.name!r} cannot be read: {err.strerror}"
            ) from None
        if size < self.offset + self.byte_size:
            raise FailedPrecondition(self._shrunk(size))

    def _shrunk(self, size: int) -> str:
        return (
            f"shared memory region {self.name!r}: its object {self.key!r} is now {size} "
            f"bytes, smaller than the registered offset + byte_size "
            f"{self.offset + self.byte_size}; the client truncated it: unregister it and "
            "register the object again"
        )

    def read(self, offset: int, byte_size: int) -> bytes:
        self.check_size()
        data = os.pread(self.fd, byte_size, self.offset + offset)
        if len(data) != byte_size:  # truncated after the check
            raise FailedPrecondition(self._shrunk(os.fstat(self.fd).st_size))
        return data

    def write(self, offset: int, data: bytes) -> None:
        self.check_size()
        written = os.pwrite(self.fd, data, self.offset + offset)
        if written != len(data):
            raise FailedPrecondition(self._shrunk(os.fstat(self.fd).st_size))


@dataclass
class _Use:
    """One tensor's place in a region, from its ``shared_memory_*`` parameters."""

    region: Region
    offset: int
    byte_size: int


class SharedMemoryRegions:
    """The registered regions, bounded in count and in total bytes. Thread-safe: a lock
    guards the table, and every read or write holds it so an unregister cannot close a
    descriptor (whose number may be reused) under an access."""

    def __init__(self, max_regions: int, max_bytes: int, max_tensor_elements: int):
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self.max_tensor_elements = max_tensor_elements
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()
        self._closed = False

    # ---- register, status, unregister ----------------------------------------------------

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name or len(name) > MAX_NAME_CHARS:
            raise InvalidArgument(
                f"shared memory region name must be 1 to {MAX_NAME_CHARS} characters"
            )
        file_name = _file_name(key)
        if offset < 0:
            raise InvalidArgument(f"shared memory region {name!r}: offset must not be negative")
        if byte_size <= 0:
            raise InvalidArgument(f"shared memory region {name!r}: byte_size must be positive")
        with self._lock:
            if self._closed:
                raise FailedPrecondition("the server is stopping; register again after restart")
            if name in self._regions:
                raise AlreadyExists(
                    f"shared memory region {name!r} is already registered; unregister it "
                    "first or pick another name"
                )
            if len(self._regions) >= self.max_regions:
                raise ResourceExhausted(
                    f"{len(self._regions)} shared memory regions are registered, the most "
                    "this server takes; unregister some (--max-shm-regions)"
                )
            total = sum(r.byte_size for r in self._regions.values())
            if total + byte_size > self.max_bytes:
                raise ResourceExhausted(
                    f"shared memory region {name!r} of {byte_size} bytes would bring the "
                    f"registered regions to {total + byte_size} bytes, over the limit of "
                    f"{self.max_bytes}; unregister some (--max-shm-mb)"
                )
            fd = _open(key, file_name)
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise InvalidArgument(f"shared memory key {key!r} is not a memory object")
                if offset + byte_size > info.st_size:
                    raise InvalidArgument(
                        f"shared memory region {name!r}: offset {offset} + byte_size "
                        f"{byte_size} is past the end of {key!r} ({info.st_size} bytes)"
                    )
            except BaseException:
                os.close(fd)
                raise
            self._regions[name] = Region(name, key, offset, byte_size, fd)

    def status(self, name: str = "") -> pb.SystemSharedMemoryStatusResponse:
        """Every region (``name`` empty) or the one named; an unknown name is NOT_FOUND."""
        with self._lock:
            if name and name not in self._regions:
                raise NotFound(_unknown(name))
            regions = [self._regions[name]] if name else list(self._regions.values())
            response = pb.SystemSharedMemoryStatusResponse()
            for r in regions:
                response.regions[r.name].CopyFrom(
                    pb.SystemSharedMemoryStatusResponse.RegionStatus(
                        name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size
                    )
                )
            return response

    def unregister(self, name: str = "") -> None:
        """Every region (``name`` empty) or the one named; an unknown name is no error
        (Triton's behaviour: unregistering is idempotent)."""
        with self._lock:
            names = [name] if name else list(self._regions)
            for n in names:
                region = self._regions.pop(n, None)
                if region is not None:
                    os.close(region.fd)

    def close(self) -> None:
        """Close every region; later registrations are refused (the server is stopping)."""
        self.unregister()
        with self._lock:
            self._closed = True

    def __len__(self) -> int:
        return len(self._regions)

    # ---- the inference hooks -------------------------------------------------------------

    def read_inputs(self, request):
        """``request`` with each shared-memory input's bytes in ``raw_input_contents`` at its
        place (changed in place and returned), so the codec sees a plain raw request; the
        same object untouched when no tensor uses shared memory (one dict lookup per tensor).
        Requested outputs' regions are checked here too, before the forward runs."""
        uses_input = _uses_shm(request.inputs)
        if not uses_input and not _uses_shm(request.outputs):
            return request
        with self._lock:
            for output in request.outputs:
                if REGION in output.parameters:
                    if "classification" in output.parameters:
                        raise InvalidArgument(
                            f"output {output.name!r} cannot set both 'shared_memory_region' "
                            "and 'classification'"
                        )
                    self._use(output.parameters, f"output {output.name!r}")
            if not uses_input:
                return request
            raw = list(request.raw_input_contents)
            plain = [t for t in request.inputs if REGION not in t.parameters]
            if raw and len(raw) != len(plain):
                raise InvalidArgument(
                    f"raw_input_contents holds {len(raw)} buffers for the {len(plain)} "
                    "inputs not in shared memory; send one per such input, in order"
                )
            if plain and not raw:
                raise InvalidArgument(
                    f"input {plain[0].name!r} has typed contents beside inputs in shared "
                    "memory; send it in raw_input_contents (as tritonclient does)"
                )
            buffers, next_raw = [], iter(raw)
            for tensor in request.inputs:
                if REGION not in tensor.parameters:
                    buffers.append(next(next_raw))
                    continue
                what = f"input {tensor.name!r}"
                if tensor.HasField("contents"):
                    raise InvalidArgument(f"{what} is in shared memory and has contents too")
                use = self._use(tensor.parameters, what)
                self._check_tensor_size(tensor, use.byte_size, what)
                buffers.append(use.region.read(use.offset, use.byte_size))
        request.ClearField("raw_input_contents")
        request.raw_input_contents.extend(buffers)
        return request

    def write_outputs(self, request, response) -> None:
        """Move each output requested in shared memory from ``raw_output_contents`` into its
        region (leaving an empty buffer, so the others keep their index, as Triton does) and
        say where it went in the output's parameters. Every size is checked before anything
        is written: an output larger than its region is INVALID_ARGUMENT, nothing written."""
        if not _uses_shm(request.outputs):
            return
        wanted = {o.name: o.parameters for o in request.outputs if REGION in o.parameters}
        with self._lock:
            moves = []
            for i, output in enumerate(response.outputs):
                if output.name not in wanted or i >= len(response.raw_output_contents):
                    continue
                use = self._use(wanted[output.name], f"output {output.name!r}")
                data = response.raw_output_contents[i]
                if len(data) > use.byte_size:
                    raise InvalidArgument(
                        f"shared memory size specified with the request for output "
                        f"{output.name!r} ({use.byte_size} bytes) should be at least "
                        f"{len(data)} bytes to hold the results"
                    )
                use.region.check_size()
                moves.append((i, output, use, data))
            for i, output, use, data in moves:
                use.region.write(use.offset, data)
                response.raw_output_contents[i] = b""
                output.parameters[REGION].string_param = use.region.name
                output.parameters[BYTE_SIZE].int64_param = len(data)
                if use.offset:
                    output.parameters[OFFSET].int64_param = use.offset

    def _use(self, parameters, what: str) -> _Use:
        """The region, offset and size a tensor's parameters name, checked against the
        region's registered size. Call with the lock held."""
        if parameters[REGION].WhichOneof("parameter_choice") != "string_param":
            raise InvalidArgument(f"{what}: '{REGION}' must be a string_param")
        name = parameters[REGION].string_param
        region = self._regions.get(name)
        if region is None:
            raise NotFound(f"{what}: {_unknown(name)}")
        if BYTE_SIZE not in parameters:
            raise InvalidArgument(f"{what}: '{REGION}' needs '{BYTE_SIZE}' too")
        byte_size = _int_param(parameters[BYTE_SIZE], BYTE_SIZE, what)
        offset = _int_param(parameters[OFFSET], OFFSET, what) if OFFSET in parameters else 0
        if offset + byte_size > region.byte_size:
            raise InvalidArgument(
                f"{what}: offset {offset} + byte size {byte_size} is past the end of shared "
                f"memory region {name!r} ({region.byte_size} bytes)"
            )
        return _Use(region, offset, byte_size)

    def _check_tensor_size(self, tensor, byte_size: int, what: str) -> None:
        """The region's bytes are the tensor's shape × datatype, and the tensor within
        --max-tensor-elements, checked before the bytes are read."""
        kind = SAFETENSORS_OF.get(tensor.datatype)
        if kind is None:
            raise InvalidArgument(
                f"{what} has datatype {tensor.datatype!r}; paramserve takes "
                f"{sorted(SAFETENSORS_OF)}"
            )
        shape = list(tensor.shape)
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"{what} has a negative dimension in {shape}")
        numel = math.prod(shape)
        if numel > self.max_tensor_elements:
            raise ResourceExhausted(
                f"{what} has {numel} elements, over the limit of {self.max_tensor_elements}; "
                "split the request (--max-tensor-elements)"
            )
        expected = numel * ITEMSIZE[kind]
        if byte_size != expected:
            raise InvalidArgument(
                f"{what}: shared memory byte size {byte_size} does not fit shape {shape} of "
                f"{tensor.datatype}, which needs {expected} bytes"
            )


def _uses_shm(tensors) -> bool:
    """Any tensor with a region: plain loops, as this runs on every request (a generator
    costs more than the check)."""
    if tensors:
        for tensor in tensors:
            if REGION in tensor.parameters:
                return True
    return False


def _int_param(param, key: str, what: str) -> int:
    choice = param.WhichOneof("parameter_choice")
    if choice not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"{what}: '{key}' must be an int64_param, not {choice}")
    value = getattr(param, choice)
    if value < 0:
        raise InvalidArgument(f"{what}: '{key}' must not be negative, not {value}")
    return value


def _unknown(name: str) -> str:
    return (
        f"no shared memory region {name!r} is registered; register it with "
        "SystemSharedMemoryRegister first"
    )


def _file_name(key: str) -> str:
    """The file under /dev/shm that ``shm_open(key)`` opens: one leading slash dropped, no
    other slash (POSIX leaves those undefined; glibc refuses them)."""
    file_name = key[1:] if key.startswith("/") else key
    if not file_name or len(file_name) > MAX_KEY_CHARS:
        raise InvalidArgument(
            f"shared memory key must be 1 to {MAX_KEY_CHARS} characters after its leading '/'"
        )
    if "/" in file_name or "\0" in file_name or file_name in (".", ".."):
        raise InvalidArgument(
            f"shared memory key {key[:MAX_KEY_CHARS]!r} must be one name, as shm_open "
            "takes it: '/' then no other '/'"
        )
    return file_name


def _open(key: str, file_name: str) -> int:
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0)
    try:
        return os.open(os.path.join(SHM_DIR, file_name), flags)
    except FileNotFoundError:
        raise NotFound(
            f"no shared memory object {key!r} on the server's host ({SHM_DIR}); create it "
            "(shm_open) before registering it"
        ) from None
    except OSError as err:
        raise InvalidArgument(f"cannot open shared memory object {key!r}: {err.strerror}") from None
