"""State_dicts in and out of blobs: parse uploads safely, validate, write canonical safetensors.

An upload is read as one of
- a safetensors file (parsed here, never trusted: every offset and length is checked),
- a ``torch.save``'d state_dict, read only with ``torch.load(weights_only=True)``,
- a mapping of names to tensors.

Tied entries (one Parameter under several names) are stored once; the header's metadata maps
every other name to the stored one (``{"4.weight": "2.weight"}``, the safetensors convention),
so a reader gets every state_dict key back and ``load_into`` ties nothing twice.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from . import tensorfile, torchsave
from .errors import DataLoss, FailedPrecondition, InvalidArgument, InvalidStateDict
from .limits import DEFAULT_LIMITS, Limits
from .tensorfile import STORED_BLOB_LIMITS, read_stored_header, stored_blob  # noqa: F401
from .values import ManifestEntry, TensorSpec


class ByteSink(Protocol):
    """Where a blob's bytes go (``HashingWriter``, or any binary file)."""

    def write(self, data: bytes | memoryview, /) -> int: ...


Source = bytes | bytearray | memoryview | str | os.PathLike | BinaryIO | Mapping[str, torch.Tensor]
COPY_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class ExpectedState:
    """What a module's state_dict holds: a spec per key, tied keys → the key kept, and each
    buffer key → the Python that reaches it (``net[2].rand_weight``), for error messages."""

    specs: dict[str, TensorSpec]
    tied: dict[str, str]
    buffers: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, module: nn.Module) -> ExpectedState:
        specs: dict[str, TensorSpec] = {}
        tied: dict[str, str] = {}
        first_name: dict[int, str] = {}
        for name, tensor in module.state_dict(keep_vars=True).items():
            if id(tensor) in first_name:
                tied[name] = first_name[id(tensor)]
            else:
                first_name[id(tensor)] = name
            shape = None if isinstance(tensor, UninitializedParameter) else tuple(tensor.shape)
            specs[name] = TensorSpec(shape, tensorfile.dtype_name(tensor.dtype))
        buffers = {name: python_path(module, name) for name, _ in module.named_buffers()}
        return cls(specs, tied, {k: v for k, v in buffers.items() if k in specs})

    def tied_groups(self) -> dict[str, tuple[str, ...]]:
        """Every key → the other keys sharing its data."""
        groups: dict[str, list[str]] = {}
        for name, kept in self.tied.items():
            groups.setdefault(kept, [kept]).append(name)
        out: dict[str, tuple[str, ...]] = {name: () for name in self.specs}
        for members in groups.values():
            for name in members:
                out[name] = tuple(m for m in members if m != name)
        return out


class UploadedState:
    """An upload opened for reading: entry specs, and a way to copy each entry's bytes."""

    def __init__(self, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        self.specs = specs

    def copy_to(self, name: str, out: ByteSink) -> None:
        """Write the entry's bytes to ``out``."""
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SafetensorsUpload(UploadedState):
    """A safetensors upload, copied byte for byte: no tensor is ever materialized."""

    def __init__(self, file: BinaryIO, size: int, owns_file: bool, limits: Limits = DEFAULT_LIMITS):
        self.file, self.owns_file = file, owns_file
        self.header = tensorfile.read_header(file, size, limits=limits)
        super().__init__({n: (e.dtype, e.shape) for n, e in self.header.entries.items()})

    def copy_to(self, name, out):
        entry = self.header.entries[name]
        self.file.seek(entry.begin)
        left = entry.nbytes
        while left:
            chunk = self.file.read(min(left, COPY_CHUNK_BYTES))
            if not chunk:
                raise InvalidArgument(f"safetensors upload truncated inside tensor {name!r}")
            out.write(chunk)
            left -= len(chunk)

    def read_bytes(self, name):
        entry = self.header.entries[name]
        self.file.seek(entry.begin)
        return self.file.read(entry.nbytes)

    def close(self):
        if self.owns_file:
            self.file.close()


class TensorMappingUpload(UploadedState):
    """A mapping of tensors (given directly, or from ``torch.load(weights_only=True)``)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        bad = [
            k
            for k, v in tensors.items()
            if not isinstance(k, str) or not isinstance(v, torch.Tensor)
        ]
        if bad:
            raise InvalidArgument(
                f"a state_dict maps names to tensors; entries {bad[:5]!r} are not tensors "
                "(a training checkpoint? upload its 'state_dict' / 'model' entry instead)"
            )
        self.tensors = dict(tensors)
        super().__init__({n: (t.dtype, tuple(t.shape)) for n, t in self.tensors.items()})

    def copy_to(self, name, out):
        out.write(tensorfile.tensor_bytes(self.tensors[name]))

    def read_bytes(self, name):
        return bytes(tensorfile.tensor_bytes(self.tensors[name]))


def open_upload(source: Source, limits: Limits = DEFAULT_LIMITS) -> UploadedState:
    """Detect the format of ``source`` and open it; bad or unsafe bytes → ``InvalidArgument``;
    a header over ``limits`` → ``ResourceExhausted``."""
    if isinstance(source, Mapping):
        return TensorMappingUpload(source)
    file: BinaryIO
    if isinstance(source, (bytes, bytearray, memoryview)):
        file, owns, path = io.BytesIO(bytes(source)), True, None
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            file, owns = open(path, "rb"), True
        except OSError as err:
            raise InvalidArgument(f"cannot read upload file {path!r}: {err.strerror}") from err
    else:
        file, owns, path = source, False, None
    try:
        start = file.read(9)
        file.seek(0, io.SEEK_END)
        size = file.tell()
        file.seek(0)
        if torchsave.is_torch_save(start):
            tensors = _torch_load(file, path if start[:4] == torchsave.ZIP_MAGIC else None)
            if owns:
                file.close()
            return TensorMappingUpload(tensors)
        if len(start) == 9 and start[8:9] == b"{":
            return SafetensorsUpload(file, size, owns, limits)
        raise torchsave.unknown_format(start)
    except BaseException:
        if owns:
            file.close()
        raise


def _torch_load(file: BinaryIO, path: str | None) -> Mapping[str, torch.Tensor]:
    """``path`` (zip format only: torch cannot mmap the legacy pickle format) is mapped, not
    read; else ``file`` is read."""
    try:
        # weights_only=True: tensors and plain containers only, never arbitrary objects.
        if path is not None:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad pickles; all mean "refused"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InvalidArgument(
            "torch.save'd upload refused: it is truncated or holds something other than "
            f"tensors ({first_line}); upload safetensors or torch.save(model.state_dict())"
        ) from err
    if not isinstance(loaded, Mapping):
        raise InvalidArgument(
            f"torch.save'd upload holds a {type(loaded).__name__}, not a "
            "state_dict; save model.state_dict()"
        )
    return loaded


def python_path(module: nn.Module, key: str) -> str:
    """How Python reaches state_dict ``key`` of ``net``: ``"2.rand_weight"`` →
    ``net[2].rand_weight`` in a Sequential, ``net.linear.weight``, else ``get_submodule``."""
    *parents, leaf = key.split(".")
    text, current = "net", module
    for part in parents:
        child = current._modules.get(part)
        if isinstance(current, (nn.Sequential, nn.ModuleList)) and part.isdigit():
            text += f"[{part}]"
        elif part.isidentifier():
            text += f".{part}"
        else:
            return f"net.get_submodule({'.'.join(parents)!r}).{leaf}"
        if child is None:
            break
        current = child
    return f"{text}.{leaf}" if leaf.isidentifier() else f"getattr({text}, {leaf!r})"


def missing_buffer_hint(missing: list[str], expected: ExpectedState) -> list[str]:
    """Why a constant buffer may be missing and the line that adds it: the guide's
    FixedHiddenMLP keeps ``rand_weight`` as a plain attribute, which ``state_dict()`` leaves
    out. The upload must carry the module's own constant (another one changes the outputs)."""
    buffers = [k for k in missing if k in expected.buffers]
    if not buffers:
        return []
    adds = "; ".join(f"state_dict[{k!r}] = {expected.buffers[k]}" for k in buffers)
    return [
        f"{', '.join(repr(k) for k in buffers)}: a constant the forward uses (a buffer here); "
        "a module that keeps it as a plain attribute, as the guide's FixedHiddenMLP does "
        "(self.rand_weight = torch.rand(...)), leaves it out of state_dict(). Add the "
        f"module's own before uploading: state_dict = net.state_dict(); {adds}"
    ]


def validate(model: str, upload: UploadedState, expected: ExpectedState) -> None:
    """Strict check of keys, shapes, dtypes and tied entries; lists every problem at once."""
    given, specs = upload.specs, expected.specs
    # A tied key may be left out (stored once, as safetensors.save_model does) or given again.
    twins = expected.tied_groups()
    missing = [k for k in specs if k not in given and not any(t in given for t in twins[k])]
    unexpected = [k for k in given if k not in specs]
    mismatched = []
    for name, spec in specs.items():
        if name not in given:
            continue
        dtype, shape = given[name]
        given_spec = TensorSpec(shape, tensorfile.dtype_name(dtype))
        if given_spec.dtype != spec.dtype or (spec.shape is not None and shape != spec.shape):
            mismatched.append((name, spec.describe(), given_spec.describe()))
    other = missing_buffer_hint(missing, expected)
    if not (missing or unexpected or mismatched):
        for name, kept in expected.tied.items():
            if (
                name in given
                and kept in given
                and upload.read_bytes(name) != upload.read_bytes(kept)
            ):
                other.append(
                    f"{name!r} and {kept!r} are one tied parameter but hold different "
                    "values; give them equal values (or leave one out)"
                )
    if missing or unexpected or mismatched or other:
        raise InvalidStateDict(model, missing, unexpected, mismatched, other)


@dataclass(frozen=True)
class CanonicalPlan:
    """The blob the store writes for a validated upload: its header, which upload entry fills
    each stored tensor (in file order), and the manifest of every state_dict key.

    Tied keys are stored once (under the key the module names first); the header's metadata
    maps the others to it. The layout depends on the specs only, never on the values, so an
    upload whose header equals ``header`` byte for byte *is* its canonical blob.
    """

    header: bytes
    sources: list[tuple[str, str]]  # (stored name, the upload's name holding its data)
    manifest: list[ManifestEntry]
    segments: tuple[tuple[str, int, int], ...] = ()  # (stored name, begin, end) in the file

    def manifest_with(self, digests: Mapping[str, str]) -> list[ManifestEntry]:
        """The manifest with each key's stored-bytes sha256 (a tied key: its kept key's)."""
        return [
            dataclasses.replace(e, sha256=digests.get(e.tied_to or e.name)) for e in self.manifest
        ]


def canonical_plan(upload: UploadedState, expected: ExpectedState) -> CanonicalPlan:
    """Plan the canonical blob of an upload that passed ``validate``."""
    source = _source_keys(upload, expected)
    order = tensorfile.canonical_order((n, upload.specs[source[n]][0]) for n in source)
    specs = [(n, *upload.specs[source[n]]) for n in order]
    header = tensorfile.build_header(specs, dict(sorted(expected.tied.items())))
    manifest = []
    for name in expected.specs:
        kept = expected.tied.get(name)
        dtype, shape = upload.specs[source[kept or name]]
        manifest.append(
            ManifestEntry(name, TensorSpec(tuple(shape), tensorfile.dtype_name(dtype)), kept)
        )
    segments, offset = [], len(header)
    for name, dtype, shape in specs:
        nbytes = tensorfile.nbytes_of(dtype, shape)
        segments.append((name, offset, offset + nbytes))
        offset += nbytes
    return CanonicalPlan(header, [(n, source[n]) for n in order], manifest, tuple(segments))


def write_canonical(out: ByteSink, upload: UploadedState, plan: CanonicalPlan) -> None:
    """Write the planned blob to ``out`` (a ``HashingWriter``, which hashes what it is given)."""
    out.write(plan.header)
    for _, name in plan.sources:
        upload.copy_to(name, out)


def _source_keys(upload: UploadedState, expected: ExpectedState) -> dict[str, str]:
    """Kept key → the upload's key holding its data (a tied twin when the kept key is absent)."""
    source = {n: n for n in expected.specs if n not in expected.tied and n in upload.specs}
    for name, kept in expected.tied.items():
        if kept not in source and name in upload.specs:
            source[kept] = name
    return source


def load_into(module: nn.Module, reader, model: str) -> None:
    """Fill ``module`` from a blob read sequentially through ``reader`` (a VerifyingReader).

    The module may be built on the meta device: it is then given CPU memory here, once, and
    filled straight from the file (no second copy of the parameters). Lazy parameters take the
    stored shapes; tied parameters get their data once. The blob's sha256 is checked when the
    last byte has been read. Whatever is wrong with the bytes is ``DataLoss`` naming the blob.
    """
    with stored_blob(reader.path):
        _load_into(module, reader, model)
    finish_lazy_modules(module)


def _load_into(module: nn.Module, reader, model: str) -> None:
    header = read_stored_header(reader, reader.size_bytes)
    state = module.state_dict(keep_vars=True)
    stored = set(header.entries) | set(header.metadata)
    if stored != set(state):
        raise FailedPrecondition(
            f"the stored version of {model!r} no longer fits its architecture's code "
            f"(missing {sorted(set(state) - stored)}, unexpected {sorted(stored - set(state))}); "
            "restore the architecture's code or upload a new version"
        )
    for entry in header.entries.values():
        if isinstance(state[entry.name], UninitializedParameter):
            state[entry.name].materialize(entry.shape, dtype=entry.dtype)
    if any(t.is_meta for t in state.values()):
        module.to_empty(device="cpu")
    state = module.state_dict(keep_vars=True)
    for entry in sorted(header.entries.values(), key=lambda e: e.begin):
        target = state[entry.name]
        if tuple(target.shape) != entry.shape or target.dtype != entry.dtype:
            raise FailedPrecondition(
                f"stored {entry.name!r} of {model!r} is {entry.dtype}{list(entry.shape)} but the "
                f"architecture makes {target.dtype}{list(target.shape)}; the code changed"
            )
        data = target.data
        if data.is_contiguous() and data.device.type == "cpu":
            with torch.no_grad():
                tensorfile.read_into(reader, data, entry.nbytes)
        else:
            scratch = torch.empty(entry.shape, dtype=entry.dtype)
            tensorfile.read_into(reader, scratch, entry.nbytes)
            with torch.no_grad():
                data.copy_(scratch)
    for name, kept in header.metadata.items():
        if state[name] is not state[kept]:
            with torch.no_grad():
                state[name].data.copy_(state[kept].data)
    reader.finish()


def read_state_dict(reader) -> dict[str, torch.Tensor]:
    """A blob as a plain state_dict; tied keys map to the same tensor object."""
    with stored_blob(reader.path):
        return _read_state_dict(reader)


def _read_state_dict(reader) -> dict[str, torch.Tensor]:
    header = read_stored_header(reader, reader.size_bytes)
    tensors: dict[str, torch.Tensor] = {}
    for entry in sorted(header.entries.values(), key=lambda e: e.begin):
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        tensorfile.read_into(reader, tensor, entry.nbytes)
        tensors[entry.name] = tensor
    for name, kept in header.metadata.items():
        if kept not in tensors:
            raise DataLoss(f"blob {reader.path} ties {name!r} to missing {kept!r}")
        tensors[name] = tensors[kept]
    reader.finish()
    return tensors


def module_upload(module: nn.Module) -> tuple[UploadedState, ExpectedState]:
    """A module's own state as an upload, ready for ``canonical_plan`` (nothing to validate)."""
    expected = ExpectedState.of(module)
    uninitialized = [n for n, s in expected.specs.items() if s.shape is None]
    if uninitialized:
        raise FailedPrecondition(
            f"parameters {uninitialized} are not initialized yet; "
            "run a first input through the model"
        )
    return TensorMappingUpload(module.state_dict()), expected


def finish_lazy_modules(module: nn.Module) -> None:
    """Turn lazy modules whose parameters are all set into their plain class (LazyLinear →
    Linear with the right ``in_features``), as their first forward would."""
    from torch.nn.modules.lazy import LazyModuleMixin

    for sub in module.modules():
        if not isinstance(sub, LazyModuleMixin) or sub.has_uninitialized_params():
            continue
        if isinstance(sub, nn.LazyLinear):
            sub.in_features = sub.weight.shape[1]
        for hook in ("_initialize_hook", "_load_hook"):
            if hasattr(sub, hook):
                getattr(sub, hook).remove()
                delattr(sub, hook)
        if sub.cls_to_become is not None:
            sub.__class__ = sub.cls_to_become
