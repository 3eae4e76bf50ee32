"""Read-only questions about a stored version, answered from the bytes they need only.

- ``parameter_infos_of``: structure from the architecture built on the meta device, specs from
  the manifest, statistics streamed from the blob one chunk at a time (the memory of a chunk,
  not of a tensor or the model), the whole blob's sha256 checked at the end.
- ``read_tensor``: the header and that tensor's byte range, checked against the tensor's own
  sha256 kept in the manifest; a version written before those digests were kept falls back
  to a sequential read of the blob, hashed whole (memory: that one tensor).
- ``module_tree_of``: the meta module given the stored shapes; no tensor data is read.
- ``entries_at``: the entries under one state_dict key or submodule path (``net[2]``'s).

Every format error while reading a stored blob is ``DataLoss`` naming it (``stored_blob``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from . import architectures, tensorfile
from .blobs import BlobStore
from .errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from .statedict import ExpectedState, finish_lazy_modules, read_stored_header, stored_blob
from .values import ManifestEntry, ModelInfo, ParameterInfo, TensorStats, VersionInfo

STATS_CHUNK_BYTES = 1 << 20  # a multiple of every element size


def meta_module(model: ModelInfo, version: VersionInfo) -> nn.Module:
    """The architecture on the meta device, lazy parameters given the stored shapes."""
    module = architectures.get(model.architecture).build(model.config, device="meta")
    state = module.state_dict(keep_vars=True)
    manifest = {e.name: e for e in version.manifest}
    if set(state) != set(manifest):
        raise FailedPrecondition(
            f"the stored version {version.number} of {model.name!r} no longer fits its "
            f"architecture's code (missing {sorted(set(state) - set(manifest))[:20]}, "
            f"unexpected {sorted(set(manifest) - set(state))[:20]}); restore the "
            "architecture's code or upload a new version"
        )
    for name, tensor in state.items():
        if isinstance(tensor, UninitializedParameter):
            spec = manifest[name].spec
            assert spec.shape is not None  # a stored version's entries have the blob's shapes
            tensor.materialize(spec.shape, dtype=tensorfile.DTYPES[spec.dtype])
    finish_lazy_modules(module)
    return module


def module_tree_of(model: ModelInfo, version: VersionInfo) -> str:
    return str(meta_module(model, version))


def parameter_infos_of(
    model: ModelInfo, version: VersionInfo, blobs: BlobStore, with_stats: bool = False
) -> list[ParameterInfo]:
    """Every state_dict entry of a stored version, in state_dict order."""
    module = meta_module(model, version)
    twins = ExpectedState.of(module).tied_groups()
    manifest = {e.name: e for e in version.manifest}
    stats = stream_stats(blobs, version.sha256) if with_stats else {}
    infos = []
    for name, tensor in module.state_dict(keep_vars=True).items():
        is_parameter = isinstance(tensor, nn.Parameter)
        entry = manifest[name]
        infos.append(
            ParameterInfo(
                name=name,
                spec=entry.spec,
                kind="parameter" if is_parameter else "buffer",
                requires_grad=bool(is_parameter and tensor.requires_grad),
                tied_with=twins[name],
                initialized=True,
                stats=stats.get(entry.tied_to or name),
            )
        )
    return infos


def entries_at(
    model: ModelInfo, infos: list[ParameterInfo], path: str
) -> tuple[list[ParameterInfo], str]:
    """``infos`` (every entry) narrowed to ``path``, and the submodule path they are under.

    An exact state_dict key gives that entry (full name, module ``""``). A submodule path gives
    its entries named as that submodule's own ``state_dict()`` names them (``"2"`` → ``weight``,
    ``bias``, the guide's ``net[2].state_dict()``); ``tied_with`` keeps full keys, since a
    tie may reach outside it. A parameterless submodule (a ReLU) has none. Anything else is
    ``NotFound`` naming the closest keys and paths.
    """
    if not path:
        return infos, ""
    exact = [p for p in infos if p.name == path]
    if exact:
        return exact, ""
    built = architectures.get(model.architecture).build(model.config, device="meta")
    modules = [name for name, _ in built.named_modules(remove_duplicate=False) if name]
    if path in modules:
        prefix = path + "."
        inside = [p for p in infos if p.name.startswith(prefix)]
        return [dataclasses.replace(p, name=p.name[len(prefix) :]) for p in inside], path
    known = [p.name for p in infos] + modules
    top = [name for name in modules if "." not in name] or [p.name for p in infos]
    nearby = difflib.get_close_matches(path[:200], known, n=6, cutoff=0.5) or top[:10]
    raise NotFound(
        f"model {model.name!r} has no parameter or submodule {str(path)[:80]!r}; "
        f"nearby: {nearby} (a state_dict key like '0.weight' or a submodule path like '0')"
    )


@dataclass
class StatsAccumulator:
    """min/max/mean/std (unbiased, as ``Tensor.std``) over chunks, merged as Chan et al.'s
    parallel variance; float64 throughout, NaN wins as in ``torch.min``."""

    count: int = 0
    total: float = 0.0
    mean: float = 0.0
    m2: float = 0.0
    low: float = math.inf
    high: float = -math.inf

    def add(self, chunk: torch.Tensor) -> None:
        n = chunk.numel()
        if n == 0:
            return
        values = chunk.to(torch.float64, copy=True)  # one float64 temporary, reused in place
        total = values.sum().item()
        mean = total / n
        low, high = values.min().item(), values.max().item()
        m2 = values.sub_(mean).square_().sum().item()
        if self.count:
            merged = self.count + n
            delta = mean - self.mean
            self.m2 += m2 + delta * delta * self.count * n / merged
            self.mean += delta * n / merged
            self.count = merged
        else:
            self.count, self.mean, self.m2 = n, mean, m2
        self.total += total
        self.low = _nan_or(min, self.low, low)
        self.high = _nan_or(max, self.high, high)

    def result(self) -> TensorStats | None:
        if self.count == 0:
            return None
        mean = self.total / self.count  # a sum, as torch.mean: inf stays inf, NaN wins
        std = math.sqrt(max(self.m2, 0.0) / (self.count - 1)) if self.count > 1 else 0.0
        return TensorStats(self.low, self.high, mean, std)


def _nan_or(pick, a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else pick(a, b)


def stream_stats(blobs: BlobStore, sha256: str) -> dict[str, TensorStats | None]:
    """Stored name → statistics, reading the blob once, front to back, a chunk at a time."""
    out: dict[str, TensorStats | None] = {}
    buffer = bytearray(STATS_CHUNK_BYTES)
    with blobs.open(sha256) as reader, stored_blob(reader.path):
        header = read_stored_header(reader, reader.size_bytes)
        for entry in sorted(header.entries.values(), key=lambda e: e.begin):
            acc, left = StatsAccumulator(), entry.nbytes
            size = tensorfile.element_size(entry.dtype)
            while left:
                n = min(left, STATS_CHUNK_BYTES)
                view = memoryview(buffer)[:n]
                tensorfile.read_exactly(reader, view)
                acc.add(torch.frombuffer(buffer, dtype=entry.dtype, count=n // size))
                left -= n
            out[entry.name] = acc.result()
        reader.finish()
    return out


def read_tensor(
    blobs: BlobStore, model: ModelInfo, version: VersionInfo, param: str
) -> torch.Tensor:
    """One state_dict entry of a stored version, reading only its bytes when its digest is
    known (DataLoss when they do not match it)."""
    entry = _manifest_entry(model, version, param)
    stored = entry.tied_to or param
    if entry.sha256 is None:
        return _read_tensor_sequentially(blobs, version.sha256, stored)
    path = blobs.path(version.sha256)
    with blobs.open_raw(version.sha256) as file, stored_blob(path):
        header = read_stored_header(file, _size_of(file))
        located = header.entries.get(stored)
        if located is None:
            raise InvalidArgument(f"its header has no tensor {stored!r}")
        digest = hashlib.sha256()
        tensor = tensorfile.read_tensor(file, located, digest)
    if digest.hexdigest() != entry.sha256:
        raise DataLoss(
            f"blob {path} is corrupt: tensor {stored!r} has sha256 "
            f"{digest.hexdigest()}, expected {entry.sha256}; restore it from a "
            "backup or delete the version that refers to it"
        )
    return tensor


def _read_tensor_sequentially(blobs: BlobStore, sha256: str, stored: str) -> torch.Tensor:
    """The whole blob read and hashed, only ``stored`` kept (a version with no digests)."""
    found: torch.Tensor | None = None
    with blobs.open(sha256) as reader, stored_blob(reader.path):
        header = read_stored_header(reader, reader.size_bytes)
        if stored not in header.entries:
            raise InvalidArgument(f"its header has no tensor {stored!r}")
        for entry in sorted(header.entries.values(), key=lambda e: e.begin):
            if entry.name == stored:
                found = torch.empty(entry.shape, dtype=entry.dtype)
                tensorfile.read_into(reader, found, entry.nbytes)
            else:
                _skip(reader, entry.nbytes)
        reader.finish()
    assert found is not None  # ``stored`` is among the header's entries, checked above
    return found


def _manifest_entry(model: ModelInfo, version: VersionInfo, param: str) -> ManifestEntry:
    for entry in version.manifest:
        if entry.name == param:
            return entry
    names = [e.name for e in version.manifest][:20]
    raise NotFound(
        f"version {version.number} of {model.name!r} has no entry "
        f"{str(param)[:80]!r}; entries: {names}"
    )


def _skip(reader, nbytes: int) -> None:
    while nbytes:
        data = reader.read(min(nbytes, STATS_CHUNK_BYTES))
        if not data:
            raise InvalidArgument(f"file truncated: {nbytes} bytes of a tensor missing")
        nbytes -= len(data)


def _size_of(file) -> int:
    """A blob's size: an object store's reader knows it, a local file is asked."""
    size = getattr(file, "size_bytes", None)
    return size if size is not None else os.fstat(file.fileno()).st_size
