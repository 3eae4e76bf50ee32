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
>>> write_every_key(path, out, "download")  # the blob with a copy under each tied name
"""

from __future__ import annotations

import os
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from paramserve.registry import tensorfile, torchsave
from paramserve.registry.errors import DataLoss, InvalidArgument, ResourceExhausted
from paramserve.registry.limits import brief

from . import wire


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
        raise InvalidArgument(
            f"a state_dict maps names to tensors; key {brief(name)} is not a string"
        )
    if is_torch_tensor(value):
        return (
            name,
            tensorfile.dtype_name(value.dtype),
            tuple(value.shape),
            lambda: tensorfile.tensor_bytes(value),
        )
    if not isinstance(value, (np.ndarray, np.generic)):
        raise InvalidArgument(
            f"state_dict entry {brief(name)} is a {type(value).__name__}, not "
            "a tensor or numpy array; " + torchsave.FIX
        )
    array = wire.c_array(value)
    return name, wire.safetensors_name(array), tuple(array.shape), lambda: array.data


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
    if start[:4] == torchsave.ZIP_MAGIC:
        torchsave.check_file(path, label)
    elif not torchsave.is_torch_save(start):  # a legacy (pre-1.6) pickle: the server reads it
        raise torchsave.unknown_format(start, label)


def _check_safetensors(f, size: int, label: str) -> None:
    try:  # the format's own bounds: the server's may be tighter, and it says so itself
        tensorfile.read_header(f, size, limits=tensorfile.STORED_BLOB_LIMITS)
    except (InvalidArgument, ResourceExhausted) as err:
        raise InvalidArgument(f"{label}: {str(err).splitlines()[0]}") from None


# ---- downloads -------------------------------------------------------------------------------


def read_arrays(path: Path, what: str) -> dict[str, np.ndarray]:
    """A downloaded (sha256-checked) blob as numpy arrays, bfloat16 and float8 widened to
    float32; tied keys map to the same array."""
    arrays: dict[str, np.ndarray] = {}
    try:
        with open(path, "rb") as f:
            header = tensorfile.read_header(
                f, os.fstat(f.fileno()).st_size, limits=tensorfile.STORED_BLOB_LIMITS
            )
            for entry in sorted(header.entries.values(), key=lambda e: e.begin):
                buffer = bytearray(entry.nbytes)
                f.seek(entry.begin)
                tensorfile.read_exactly(f, memoryview(buffer))
                carried = wire.bits(entry.dtype_name, buffer, entry.shape, entry.name)
                arrays[entry.name] = wire.to_numpy(entry.dtype_name, carried)
    except (InvalidArgument, ResourceExhausted) as err:
        raise DataLoss(
            f"{what} is not a readable safetensors blob ({str(err).splitlines()[0]})"
            "; the server's copy may be damaged: `paramserve check` on it"
        ) from None
    for name, kept in header.metadata.items():
        if kept not in arrays:
            raise DataLoss(f"{what} ties {brief(name)} to {brief(kept)}, which it does not hold")
        arrays[name] = arrays[kept]
    return arrays


def write_every_key(blob: Path, out, what: str) -> bool:
    """Write ``blob`` to the binary file ``out`` as a safetensors file holding every
    state_dict key: each tied name (stored once, named in the header's metadata) gets its own
    copy of the kept tensor's bytes, so ``load_state_dict(load_file(f), strict=True)`` finds
    every key; the metadata still says which names are one tensor. Returns False, writing
    nothing, when the blob ties nothing (then it is the download as is, its sha256 the
    version's). One tensor is in memory at a time."""
    try:
        with open(blob, "rb") as f:
            header = tensorfile.read_header(
                f, os.fstat(f.fileno()).st_size, limits=tensorfile.STORED_BLOB_LIMITS
            )
            if not header.metadata:
                return False
            tensors = []
            for name, kept in [(n, n) for n in header.entries] + list(header.metadata.items()):
                entry = header.entries.get(kept)
                if entry is None:
                    raise DataLoss(f"{what} ties {brief(name)} to {brief(kept)}, which it lacks")
                tensors.append((name, entry.dtype_name, entry.shape, _bytes_of(f, entry)))
            tensorfile.write_raw(out, tensors, header.metadata)
    except (InvalidArgument, ResourceExhausted) as err:
        raise DataLoss(
            f"{what} is not a readable safetensors blob ({str(err).splitlines()[0]})"
            "; the server's copy may be damaged: `paramserve check` on it"
        ) from None
    return True


def _bytes_of(f, entry: tensorfile.TensorEntry):
    def read() -> memoryview:
        buffer = bytearray(entry.nbytes)
        f.seek(entry.begin)
        tensorfile.read_exactly(f, memoryview(buffer))
        return memoryview(buffer)

    return read


def write_npz(file, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez``'s format, written here: ``savez(file, **arrays)`` breaks on a key named
    ``file`` or ``allow_pickle``, and any key may be a parameter's name."""
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
