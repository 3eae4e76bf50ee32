"""An upload that arrives in chunks (a network stream), written while it arrives.

Its first bytes pick one of two paths:

- **Straight to the blob** when it is canonical safetensors: the header parses, the state_dict
  it describes fits the architecture (``validate``), and it is byte for byte the header the
  store would write for those tensors (``canonical_plan``). The upload then *is* its blob, so
  every chunk goes into the blob's temp file, hashed on the way: one pass over the bytes.
  ``tensorfile.write_tensors`` (so our client, given a dict of tensors) and the store's own
  downloads produce such files, as long as tied entries are given once.
- **Spooled** otherwise (torch.save pickles, other safetensors layouts such as the
  safetensors library's, tied entries given twice): the bytes go to a temp file under the
  spool dir, hashed on the way, and ``finish`` hands it to ``Store.upload``, which validates
  and rewrites it (a pickle with ``torch.load(weights_only=True)``).

A safetensors upload whose header describes a state_dict that cannot fit is refused as soon
as the header is in; bytes that are neither format as soon as 9 are in; a torch.save zip whose
pickle (written first, before the tensors) names a class weights_only loading refuses, as
soon as that pickle is in (``torchsave.check_stream_start``). Whatever fails, nothing is
left: no version row, no blob, no temp file (a crash may leave a temp file, which
``paramserve check --repair`` removes).
"""

from __future__ import annotations

import io
import struct
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from . import tensorfile, torchsave
from .blobs import TEMP_SUFFIX
from .blobstore import Blobs, BlobWriter
from .errors import FailedPrecondition, InvalidArgument
from .fileio import Crc32c, HashingWriter
from .limits import Limits
from .shapes import ShapeOracle
from .statedict import CanonicalPlan, Source, UploadedState, canonical_plan, validate
from .values import ManifestEntry, ModelInfo, VersionInfo

HEADER_PEEK_LIMIT = 8 << 20  # a larger safetensors header is spooled, not held in memory
PICKLE_PEEK_LIMIT = 4 << 20  # a torch.save pickle not complete by then is spooled unchecked


class UploadTarget(Protocol):
    """What an upload needs of the store (``Store`` is one)."""

    limits: Limits
    shapes: ShapeOracle
    blobs: Blobs

    def upload(
        self,
        name: str,
        source: Source,
        alias: str | None = None,
        *,
        provenance: Mapping[str, Any] | None = None,
        note: str = "",
        author: str = "",
    ) -> VersionInfo: ...

    def add_version(
        self,
        name: str,
        blob: BlobWriter,
        manifest: Sequence[ManifestEntry],
        origin: str,
        parent: int | None = None,
        alias: str | None = None,
        first_only: bool = False,
        *,
        provenance: Mapping[str, Any] | None = None,
        note: str = "",
        author: str = "",
        optimizer_sha256: str | None = None,
    ) -> VersionInfo: ...


class StreamedUpload:
    """One upload of ``size`` announced bytes; made by ``Store.begin_upload``.

    ``write`` and ``finish`` block (hashing, file I/O, SQL): call them off an event loop, one
    at a time. ``abort`` may come from any thread; it waits for a write in progress.
    """

    def __init__(
        self,
        store: UploadTarget,
        model: ModelInfo,
        size: int,
        alias: str | None,
        spool_dir: Path,
        sha256: str | None = None,
        *,
        provenance: Mapping[str, Any] | None = None,
        note: str = "",
        author: str = "",
    ):
        self._store = store
        # recorded with the version; ``finish`` adds the verified sha256 of the bytes sent
        self.provenance = dict(provenance or {})
        self.note = note
        self.author = author
        self.declared_sha256 = sha256 or None  # known before the bytes: the blob store may use it
        # the CRC32C of the bytes, for a client that checks them in transit with it instead of a
        # sha256 of its own (UploadTrailer.crc32c); not needed when the header had the sha256
        self._crc32c: Crc32c | None = None if self.declared_sha256 else Crc32c()
        self.model = model
        self.size = size
        self.alias = alias
        self.spool_dir = spool_dir
        self.received = 0
        self._prefix = bytearray()  # the first bytes, held until they pick the path
        self._file: BlobWriter | None = None  # the blob's writer, or a spool (HashingWriter)
        self._plan: CanonicalPlan | None = None  # set when the bytes go straight to the blob
        self._lock = threading.Lock()
        self._ended = False
        self._scanned = 0  # prefix bytes at the last look at a torch.save pickle

    @property
    def decided(self) -> bool:
        """True once the first bytes have picked the path (and passed the early checks)."""
        return self._file is not None

    @property
    def direct(self) -> bool:
        """True when the bytes go straight into the blob (canonical safetensors)."""
        return self._plan is not None

    def write(self, chunks: Iterable[bytes]) -> None:
        """Take the next chunks, in order; any failure discards the upload."""
        with self._lock:
            if self._ended:
                raise FailedPrecondition("this upload has ended; start a new one")
            try:
                chunks = list(chunks)
                while chunks and self._file is None:
                    self._take(chunks.pop(0))
                if chunks:
                    self._take_many(chunks)
            except BaseException:
                self._discard()
                raise

    def finish(self, sha256: str | None, crc32c: int | None = None) -> VersionInfo:
        """Check the size of what arrived, its ``sha256`` (hex) and its ``crc32c`` (each when
        given; one at least), then store it as the next version. The sha256 of the bytes is
        computed here whatever the client sent: it is the blob's content address. Whatever
        happens, the upload is over afterwards."""
        with self._lock:
            if self._ended:
                raise FailedPrecondition("this upload has ended; start a new one")
            try:
                if self.received != self.size:
                    raise InvalidArgument(
                        f"upload ended after {self.received} of the "
                        f"{self.size} bytes its header announced; send the "
                        "whole file"
                    )
                if self._file is None:
                    self._choose_path(ended=True)
                file = self._file
                assert file is not None  # the whole upload is in: the path is chosen
                if not sha256 and crc32c is None:
                    raise InvalidArgument(
                        "upload has neither a sha256 nor a crc32c to check its bytes with"
                    )
                got = self._crc32c
                if crc32c is not None and got is not None and crc32c != got.value:
                    raise InvalidArgument(
                        f"upload's crc32c is {got.value:08x}, the client says "
                        f"{crc32c:08x}; the bytes were damaged in transit, send them again"
                    )
                if sha256 and file.sha256 != sha256.lower():
                    raise InvalidArgument(
                        f"upload's sha256 is {file.sha256}, the client "
                        f"says {sha256}; the bytes were damaged in transit, "
                        "send them again"
                    )
                self.provenance["file_sha256"] = file.sha256
                return self._store_version()
            finally:
                self._discard()

    def abort(self) -> None:
        """Drop whatever was written; a no-op once the upload has ended."""
        with self._lock:
            self._discard()

    # ---- internals ----------------------------------------------------------------------

    def _take(self, data: bytes) -> None:
        """One chunk while the path is not chosen yet: it joins the prefix."""
        self._count(len(data))
        self._check_sum([data])
        self._prefix += data
        self._choose_path(ended=False)

    def _take_many(self, chunks: list[bytes]) -> None:
        assert self._file is not None  # called once the path is chosen
        self._count(sum(len(data) for data in chunks))
        self._check_sum(chunks)
        self._file.write_many(chunks)

    def _check_sum(self, chunks: list[bytes]) -> None:
        if self._crc32c is not None:
            for data in chunks:
                self._crc32c.update(data)

    def _count(self, n: int) -> None:
        if self.received + n > self.size:
            raise InvalidArgument(
                f"upload sent more than the {self.size} bytes its header announced"
            )
        self.received += n

    def _choose_path(self, ended: bool) -> None:
        """Open the blob or the spool once the first bytes tell which, and write them there;
        waits (does nothing) while a safetensors header is still incomplete."""
        need = _header_end(self._prefix)
        if need is not None and len(self._prefix) < need and not ended:
            return
        if need is None and self._prefix[8:9] != b"{" and not self._torch_save_checked(ended):
            return  # (a "{" there: safetensors with a header over the peek limit, spooled)
        plan = None
        if need is not None and len(self._prefix) >= need:
            plan = self._direct_plan(bytes(self._prefix[:need]))
        if plan is not None:
            self._file = self._store.blobs.create(plan.segments, sha256=self.declared_sha256)
            self._plan = plan
        else:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            self._file = HashingWriter(self.spool_dir / f"upload-{uuid.uuid4().hex}{TEMP_SUFFIX}")
        self._file.write(self._prefix)
        self._prefix = bytearray()

    def _torch_save_checked(self, ended: bool) -> bool:
        """Bytes that are not safetensors: refused now unless torch.save's; for a zip, False
        (wait) until its pickle is in and checked, or ``PICKLE_PEEK_LIMIT`` bytes are. Looks
        again each time the prefix has doubled: linear work whatever the chunk size."""
        prefix = self._prefix
        if not torchsave.is_torch_save(prefix):
            raise torchsave.unknown_format(prefix)
        if prefix[:4] != torchsave.ZIP_MAGIC:
            return True
        last_look = ended or len(prefix) >= PICKLE_PEEK_LIMIT
        if not last_look and len(prefix) < 2 * self._scanned:
            return False
        self._scanned = len(prefix)
        return torchsave.check_stream_start(bytes(prefix)) or last_look

    def _direct_plan(self, head: bytes) -> CanonicalPlan | None:
        """The blob's plan when ``head`` is the canonical header of a state_dict that fits;
        ``None`` when the upload must be spooled. Raises ``InvalidStateDict`` when it cannot
        fit, as ``Store.upload`` would, but before the rest of the bytes are sent."""
        try:
            header = tensorfile.read_header(io.BytesIO(head), self.size, limits=self._store.limits)
        except InvalidArgument:
            return None  # the spooled path reports it, after the size and sha256 checks
        upload = UploadedState({n: (e.dtype, e.shape) for n, e in header.entries.items()})
        expected = self._store.shapes.expected_state(self.model, upload.specs)
        if any(
            name in upload.specs and kept in upload.specs for name, kept in expected.tied.items()
        ):
            return None  # tied entries given twice: their values must be compared
        validate(self.model.name, upload, expected)
        plan = canonical_plan(upload, expected)
        return plan if plan.header == head else None

    def _store_version(self) -> VersionInfo:
        blob = self._file
        assert blob is not None  # called by finish, once the path is chosen
        if self._plan is None:
            assert isinstance(blob, HashingWriter)  # the spool
            blob.close()
            return self._store.upload(
                self.model.name,
                blob.path,
                alias=self.alias,
                provenance=self.provenance,
                note=self.note,
                author=self.author,
            )
        self._file = None  # add_version owns it now
        return self._store.add_version(
            self.model.name,
            blob,
            self._plan.manifest_with(blob.segment_sha256),
            "upload",
            alias=self.alias,
            provenance=self.provenance,
            note=self.note,
            author=self.author,
        )

    def _discard(self) -> None:
        self._ended = True
        self._prefix = bytearray()
        if self._file is not None:
            self._file.discard()


def _header_end(prefix: bytes | bytearray) -> int | None:
    """Where a safetensors header in ``prefix`` ends (9 while that is not known yet); ``None``
    when the upload cannot go straight to a blob: not safetensors, or a huge header."""
    if len(prefix) < 9:
        return 9
    if prefix[8:9] != b"{":
        return None
    (length,) = struct.unpack_from("<Q", prefix)
    return 8 + length if length <= HEADER_PEEK_LIMIT else None
