"""The files the client sends and receives, without torch: upload sources checked before a
byte is sent, and downloaded blobs read as numpy arrays.

An upload is refused here, before it costs a transfer, when its format already says it cannot
be stored: a safetensors header that does not parse, a torch.save zip that is truncated or is
no torch.save archive, a pickle naming a class (``torch.save(model)`` instead of its
state_dict). The server still checks everything (and ``torch.load(weights_only=True)`` is the
last word on a pickle); these are only its refusals, made early.

>>> with upload_path(source) as (path, label):  # bytes or a dict of tensors via a temp file
...     check_upload(path, label)               # InvalidArgument naming the problem
>>> arrays = read_arrays(path)    # a downloaded blob: {name: np.ndarray}
"""

from __future__ import annotations

import os
import pickletools
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from paramserve.registry import tensorfile
from paramserve.registry.errors import DataLoss, InvalidArgument, ResourceExhausted
from paramserve.registry.limits import brief

from . import wire

MAX_PICKLE_SCAN_BYTES = 16 << 20  # a state_dict's data.pkl is small; a larger one is not scanned
# Top-level packages a state_dict's pickle may name; torch.load(weights_only=True) refuses any
# other (and torch.nn's modules), so a pickle naming one would be refused after its upload.
PICKLE_PACKAGES = frozenset({"torch", "collections", "builtins", "__builtin__", "_codecs",
                             "copyreg", "numpy", "math"})
NOT_STATE_DICT_FIX = "save and upload model.state_dict() (torch.save or safetensors)"


def torch_module():
    """torch when the caller has imported it (then a torch tensor may come our way), else None:
    the client never imports torch itself for a caller who does not use it."""
    return sys.modules.get("torch")


def is_torch_tensor(value: Any) -> bool:
    torch = torch_module()
    return torch is not None and isinstance(value, torch.Tensor)


@contextmanager
def upload_path(source) -> Iterator[tuple[Path, str]]:
    """A path for an upload source and what to call it in errors: a path as is, bytes or a
    mapping via a temp file."""
    if isinstance(source, (str, os.PathLike)):
        yield Path(source), Path(source).name
        return
    fd, name = tempfile.mkstemp(suffix=".upload")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(source, Mapping):
                tensorfile.write_raw(f, [_raw_tensor(k, v) for k, v in source.items()])
            else:
                f.write(bytes(source))
        yield Path(name), "the upload"
    finally:
        Path(name).unlink(missing_ok=True)


def _raw_tensor(name, value) -> tensorfile.RawTensor:
    """One state_dict entry for ``write_raw``: a torch tensor (its own dtype, bfloat16 too) or
    a numpy array."""
    if not isinstance(name, str):
        raise InvalidArgument(f"a state_dict maps names to tensors; key {brief(name)} is not a "
                              "string")
    if is_torch_tensor(value):
        return (name, tensorfile.dtype_name(value.dtype), tuple(value.shape),
                lambda: tensorfile.tensor_bytes(value))
    if not isinstance(value, np.ndarray):
        raise InvalidArgument(f"state_dict entry {brief(name)} is a {type(value).__name__}, not "
                              "a tensor or numpy array; " + NOT_STATE_DICT_FIX)
    array = np.ascontiguousarray(value)
    return name, wire.safetensors_name(array), tuple(array.shape), lambda: memoryview(array)


# ---- checks before an upload ----------------------------------------------------------------

def check_upload(path: Path, label: str) -> None:
    """Refuse ``path`` now when its format says the server would refuse it after the upload;
    ``label`` names it in the error."""
    try:
        with open(path, "rb") as f:
            start = f.read(9)
            size = os.fstat(f.fileno()).st_size
            if len(start) == 9 and start[8:9] == b"{":
                f.seek(0)
                _check_safetensors(f, size, label)
                return
    except OSError as err:
        raise InvalidArgument(f"cannot read upload file {str(path)!r}: {err.strerror}") from None
    if start[:4] == b"PK\x03\x04":
        check_torch_zip(path, label)
    elif start[:1] != b"\x80":  # a legacy (pre-1.6) torch.save pickle: the server reads it
        raise InvalidArgument(f"{label} is neither safetensors nor a torch.save'd state_dict "
                              f"(it starts with {start[:8]!r}); {NOT_STATE_DICT_FIX}")


def _check_safetensors(f, size: int, label: str) -> None:
    try:  # the format's own bounds: the server's may be tighter, and it says so itself
        tensorfile.read_header(f, size, limits=tensorfile.STORED_BLOB_LIMITS)
    except (InvalidArgument, ResourceExhausted) as err:
        raise InvalidArgument(f"{label}: {str(err).splitlines()[0]}") from None


def check_torch_zip(path: Path, label: str) -> None:
    """A torch.save file (zip format) must open as a zip (its central directory is at the end,
    so a truncated file fails here), hold one ``<archive>/data.pkl``, and its pickle may name
    only what ``torch.load(weights_only=True)`` can accept."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            pickles = [i for i in infos if i.filename.count("/") == 1
                       and i.filename.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise InvalidArgument(
                    f"{label} is a zip archive with {len(pickles)} <archive>/data.pkl "
                    f"entries, not a torch.save file (which holds one); {NOT_STATE_DICT_FIX}")
            if pickles[0].file_size <= MAX_PICKLE_SCAN_BYTES:
                with archive.open(pickles[0]) as pickle:
                    _check_pickle_globals(pickle.read(), label)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as err:
        raise InvalidArgument(f"{label} is not a readable torch.save file: the zip archive "
                              f"is damaged or truncated ({err}); save it again") from None


def _check_pickle_globals(data: bytes, label: str) -> None:
    """Reads the pickle's opcodes, never runs them: each class or function it names must come
    from a package a state_dict uses (``torch.save(model)`` names ``torch.nn.modules.*`` or
    ``__main__``)."""
    strings: list[str] = []  # recent string pushes, for STACK_GLOBAL (protocol 4)
    memo: dict[int, str] = {}
    for op, arg, _ in pickletools.genops(data):
        name = None
        if op.name == "GLOBAL":
            name = str(arg).replace(" ", ".", 1)
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            name = f"{strings[-2]}.{strings[-1]}"
        elif isinstance(arg, str) and "UNICODE" in op.name:
            strings.append(arg)
        elif op.name == "MEMOIZE" and strings:
            memo[len(memo)] = strings[-1]
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
            memo[int(arg)] = strings[-1]
        elif op.name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
            strings.append(memo[int(arg)])
        if name is not None:
            package = name.split(".", 1)[0]
            if package not in PICKLE_PACKAGES or name.startswith("torch.nn.modules."):
                raise InvalidArgument(
                    f"{label} pickles {brief(name)}, which the server refuses to load "
                    "(it reads tensors only, with torch.load(weights_only=True)); a whole "
                    "model saved with torch.save(model)? " + NOT_STATE_DICT_FIX)


# ---- downloads -------------------------------------------------------------------------------

def read_arrays(path: Path, what: str) -> dict[str, np.ndarray]:
    """A downloaded (sha256-checked) blob as numpy arrays, bfloat16 and float8 widened to
    float32; tied keys map to the same array."""
    arrays: dict[str, np.ndarray] = {}
    try:
        with open(path, "rb") as f:
            header = tensorfile.read_header(f, os.fstat(f.fileno()).st_size,
                                            limits=tensorfile.STORED_BLOB_LIMITS)
            for entry in sorted(header.entries.values(), key=lambda e: e.begin):
                buffer = bytearray(entry.nbytes)
                f.seek(entry.begin)
                tensorfile.read_exactly(f, memoryview(buffer))
                carried = wire.bits(entry.dtype_name, buffer, entry.shape, entry.name)
                arrays[entry.name] = wire.to_numpy(entry.dtype_name, carried)
    except (InvalidArgument, ResourceExhausted) as err:
        raise DataLoss(f"{what} is not a readable safetensors blob ({str(err).splitlines()[0]})"
                       "; the server's copy may be damaged: `paramserve check` on it") from None
    for name, kept in header.metadata.items():
        if kept not in arrays:
            raise DataLoss(f"{what} ties {brief(name)} to {brief(kept)}, which it does not hold")
        arrays[name] = arrays[kept]
    return arrays
