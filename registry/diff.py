"""The difference between two stored versions, tensor by tensor, streamed from their blobs.

Neither version is loaded whole: each tensor is read by its byte range (the safetensors header
gives the offsets) from both blobs, ``DIFF_CHUNK_BYTES`` at a time, so memory is two chunks
(and their float64 copies) whatever the size of a tensor or of the model. Skipped without
reading: everything when the two versions share one blob, and a tensor whose stored sha256
(kept in the manifest) is the same in both. Every tensor read is checked against its sha256
(``DataLoss`` when it does not match).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from . import tensorfile
from .blobstore import Blobs
from .errors import DataLoss, InvalidArgument
from .queries import _size_of
from .statedict import read_stored_header, stored_blob
from .values import ManifestEntry, VersionInfo

DIFF_CHUNK_BYTES = 1 << 20  # a multiple of every element size


@dataclass(frozen=True)
class TensorDiff:
    name: str
    status: str  # same | changed | only_a | only_b | shape (shape or dtype differ)
    shape: tuple[int, ...]
    dtype: str
    elements: int
    changed_elements: int = 0
    max_abs_diff: float = 0.0
    l2_diff: float = 0.0  # ||a - b||
    relative_change: float = 0.0  # ||a - b|| / ||a|| (inf when a is 0 and b is not)

    @property
    def changed(self) -> bool:
        return self.status != "same"


@dataclass(frozen=True)
class VersionDiff:
    a: VersionInfo
    b: VersionInfo
    identical: bool  # one blob
    tensors: int
    diffs: tuple[TensorDiff, ...]  # changed ones only, unless asked for all

    @property
    def changed(self) -> int:
        return sum(1 for d in self.diffs if d.changed)


def diff_versions(
    blobs: Blobs,
    a: VersionInfo,
    b: VersionInfo,
    include_all: bool = False,
    chunk_bytes: int = DIFF_CHUNK_BYTES,
) -> VersionDiff:
    """Compare ``a`` and ``b`` entry by entry (state_dict keys; a tied key as its target)."""
    entries_a = {e.name: e for e in a.manifest}
    entries_b = {e.name: e for e in b.manifest}
    names = list(entries_a) + [n for n in entries_b if n not in entries_a]
    if a.sha256 == b.sha256:
        same = tuple(_same(entries_a[n]) for n in names) if include_all else ()
        return VersionDiff(a, b, True, len(names), same)
    with ExitStack() as stack:
        files: dict[str, tuple] = {}

        def opened(version: VersionInfo):
            if version.sha256 not in files:
                file = stack.enter_context(blobs.open_raw(version.sha256))
                with stored_blob(blobs.path(version.sha256)):
                    header = read_stored_header(file, _size_of(file))
                files[version.sha256] = (file, header, blobs.path(version.sha256))
            return files[version.sha256]

        out = []
        for name in names:
            diff = _diff_entry(name, entries_a, entries_b, a, b, opened, chunk_bytes)
            if include_all or diff.changed:
                out.append(diff)
    return VersionDiff(a, b, False, len(names), tuple(out))


def _diff_entry(name, entries_a, entries_b, a, b, opened, chunk_bytes) -> TensorDiff:
    ea, eb = entries_a.get(name), entries_b.get(name)
    if ea is None or eb is None:
        e = eb if ea is None else ea
        assert e is not None
        shape = tuple(e.spec.shape or ())
        return TensorDiff(
            name, "only_b" if ea is None else "only_a", shape, e.spec.dtype, math.prod(shape)
        )
    if ea.spec != eb.spec:
        shape = tuple(ea.spec.shape or ())
        return TensorDiff(name, "shape", shape, ea.spec.dtype, math.prod(shape))
    stored_a = _stored(ea, entries_a)
    stored_b = _stored(eb, entries_b)
    if stored_a.sha256 is not None and stored_a.sha256 == stored_b.sha256:
        return _same(ea)
    return _streamed(name, ea, opened(a), stored_a, opened(b), stored_b, chunk_bytes)


def _stored(entry: ManifestEntry, entries: dict[str, ManifestEntry]) -> ManifestEntry:
    """The entry whose bytes a tied entry shares (itself when not tied)."""
    return entries.get(entry.tied_to, entry) if entry.tied_to else entry


def _same(entry: ManifestEntry) -> TensorDiff:
    shape = tuple(entry.spec.shape or ())
    return TensorDiff(entry.name, "same", shape, entry.spec.dtype, math.prod(shape))


def _streamed(name, entry, side_a, stored_a, side_b, stored_b, chunk_bytes) -> TensorDiff:
    """Statistics accumulated chunk by chunk over the two byte ranges."""
    shape = tuple(entry.spec.shape or ())
    dtype = _dtype(entry.spec.dtype)
    size = tensorfile.element_size(dtype)
    chunk = max(size, chunk_bytes - chunk_bytes % size)
    located_a = _located(side_a, stored_a.name)
    located_b = _located(side_b, stored_b.name)
    digest_a, digest_b = hashlib.sha256(), hashlib.sha256()
    changed, max_abs, sq_diff, sq_a = 0, 0.0, 0.0, 0.0
    pieces = zip(
        _chunks(side_a[0], located_a, chunk, digest_a),
        _chunks(side_b[0], located_b, chunk, digest_b),
        strict=True,
    )
    for raw_a, raw_b in pieces:
        ta = torch.frombuffer(raw_a, dtype=dtype) if raw_a else torch.empty(0, dtype=dtype)
        tb = torch.frombuffer(raw_b, dtype=dtype) if raw_b else torch.empty(0, dtype=dtype)
        if dtype == torch.bool:
            ta, tb = ta.to(torch.uint8), tb.to(torch.uint8)
        differs = ta != tb
        if ta.is_floating_point():
            differs &= ~(torch.isnan(ta) & torch.isnan(tb))
        n = int(differs.sum())
        fa = ta.to(torch.float64)
        sq_a += float((fa * fa).sum())
        if n:
            delta = (fa - tb.to(torch.float64))[differs]
            changed += n
            max_abs = max(max_abs, float(delta.abs().max()))
            sq_diff += float((delta * delta).sum())
    for stored, digest, side in ((stored_a, digest_a, side_a), (stored_b, digest_b, side_b)):
        if stored.sha256 is not None and digest.hexdigest() != stored.sha256:
            raise DataLoss(
                f"blob {side[2]} is corrupt: tensor {stored.name!r} has sha256 "
                f"{digest.hexdigest()}, expected {stored.sha256}; restore it from a backup "
                "or delete the version that refers to it"
            )
    l2 = math.sqrt(sq_diff)
    norm_a = math.sqrt(sq_a)
    relative = l2 / norm_a if norm_a else (math.inf if l2 else 0.0)
    return TensorDiff(
        name,
        "changed" if changed else "same",
        shape,
        entry.spec.dtype,
        math.prod(shape),
        changed,
        max_abs,
        l2,
        relative,
    )


def _dtype(name: str) -> torch.dtype:
    return tensorfile.TensorEntry(name="", dtype_name=name, shape=(), begin=0, end=0).dtype


def _located(side, stored_name: str) -> tensorfile.TensorEntry:
    file, header, path = side
    located = header.entries.get(stored_name)
    if located is None:
        raise DataLoss(
            f"blob {path} has no tensor {stored_name!r} though its version lists it; restore "
            "it from a backup or delete the version that refers to it"
        )
    return located


def _chunks(file, located: tensorfile.TensorEntry, chunk: int, digest) -> Iterator[bytearray]:
    """The entry's bytes, ``chunk`` at a time (one empty piece for an empty tensor)."""
    file.seek(located.begin)
    left = located.nbytes
    if not left:
        yield bytearray()
        return
    while left:
        buffer = bytearray(min(chunk, left))
        try:
            tensorfile.read_exactly(file, memoryview(buffer), digest)
        except InvalidArgument as err:
            raise DataLoss(f"a stored blob is truncated: {err}") from err
        left -= len(buffer)
        yield buffer
