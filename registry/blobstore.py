"""What the store needs of a blob store, and which one a ``--blob-url`` names.

Two implementations: ``blobs.BlobStore``, a local directory (the default, ``<data-dir>/blobs``),
and ``s3blobs.S3BlobStore``, S3-compatible object storage (``s3://BUCKET/PREFIX``). Both keep a
blob under its content address (``…/sha256/ab/<sha256>.safetensors``), write it in one pass
hashed on the way, publish it only once its bytes are all there, and check its sha256 on every
full read (``DataLoss`` when it does not match). *When* a blob may be deleted is decided by
``gc.BlobCollector``, through the database, for both.

``open_blob_store`` imports boto3 only for an ``s3://`` URL: the CLI and the lean client never
pay for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import InvalidArgument


@dataclass(frozen=True)
class BlobRef:
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class Temporary:
    """Something a write in flight (or a crashed one) left: a temp file, an unfinished
    multipart upload, a temp object. ``handle``: what ``remove_temporary`` needs."""

    label: str
    age_s: float
    handle: Any = None


class BlobWriter(Protocol):
    """One blob being written, front to back, hashed on the way (``create``)."""

    @property
    def size(self) -> int: ...

    @property
    def sha256(self) -> str: ...

    @property
    def segment_sha256(self) -> dict[str, str]: ...

    def write(self, data) -> int: ...

    def write_many(self, buffers: list) -> int: ...

    def discard(self) -> None: ...


class BlobReader(Protocol):
    """A blob read once, front to back; ``finish()`` checks its sha256 (``DataLoss``)."""

    path: Any
    size_bytes: int

    def read(self, size: int = -1) -> bytes: ...

    def readinto(self, buffer) -> int: ...

    def finish(self) -> None: ...

    def drop_behind(self) -> None:
        """Keep no page cache behind a one-time read (a no-op where there is none)."""

    def close(self) -> None: ...

    def __enter__(self) -> BlobReader: ...

    def __exit__(self, *exc) -> None: ...


class RangedReader(Protocol):
    """A blob read in ranges (``seek`` then ``read``/``readinto``): a local file, or an
    object store's reader, which also has ``size_bytes`` (a file is sized by ``fstat``)."""

    def seek(self, offset: int, whence: int = 0) -> int: ...

    def read(self, size: int = -1) -> bytes: ...

    def readinto(self, buffer) -> int: ...

    def close(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc) -> Any: ...


class Blobs(Protocol):
    """A content-addressed blob store."""

    def path(self, sha256: str) -> Any:
        """Where the blob lives (a ``Path`` or an ``s3://`` URL), for messages and reports."""

    def exists(self, sha256: str) -> bool: ...

    def create(
        self, segments: Sequence[tuple[str, int, int]] = (), sha256: str | None = None
    ) -> BlobWriter:
        """A writer for one blob; ``sha256``: its digest when declared before the bytes."""

    def commit(self, writer: Any) -> BlobRef:
        """Publish a written blob under its sha256; the caller holds it (``gc``)."""

    def write(self, produce: Callable[[Any], None]) -> BlobRef: ...

    def open(self, sha256: str) -> BlobReader: ...

    def open_raw(self, sha256: str) -> RangedReader:
        """For ranged reads (seek, read): nothing is verified, check what you read."""

    def verify(self, sha256: str) -> None: ...

    def delete(self, sha256: str) -> None: ...

    def list_blobs(self) -> Iterator[tuple[str, str]]:
        """``(sha256, label)`` of every published blob, in sha256 order."""

    def temporaries(self) -> list[Temporary]: ...

    def remove_temporary(self, temporary: Temporary) -> None: ...

    def close(self) -> None: ...


def write_blob(store, produce: Callable[[Any], None]) -> BlobRef:
    """``produce(writer)`` on a new blob of ``store`` (its ``create``), committed when it
    returns; if it raises, the blob is discarded and nothing appears in the store."""
    writer = store.create()
    try:
        produce(writer)
    except BaseException:
        writer.discard()
        raise
    return store.commit(writer)


def open_blob_store(
    blob_url: str | None, default_dir: str | Path, s3_endpoint_url: str | None = None
) -> Blobs:
    """The blob store ``blob_url`` names: ``s3://BUCKET/PREFIX``, a directory (``file://``
    or a plain path), or, when empty, ``default_dir``."""
    from .blobs import BlobStore

    if not blob_url:
        return BlobStore(default_dir)
    if blob_url.startswith("s3://"):
        from .s3blobs import S3BlobStore

        return S3BlobStore(blob_url, endpoint_url=s3_endpoint_url)
    if "://" in blob_url and not blob_url.startswith("file://"):
        raise InvalidArgument(
            f"--blob-url {blob_url[:200]!r}: give s3://BUCKET/PREFIX or a directory"
        )
    return BlobStore(blob_url.removeprefix("file://"))
