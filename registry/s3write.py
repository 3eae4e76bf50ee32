"""Writing one blob into the bucket: ``S3BlobWriter`` (see ``s3blobs`` for the whole story).

The bytes are hashed as they arrive and go up in parts, one in flight (on the store's
``part_uploads`` threads) while the next fills, so producing and sending overlap; where the
parts go (the blob's key when its sha256 was declared, else a temp key) and how the blob is
published (a conditional put, complete or copy: never over an existing key) is decided here.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from .errors import InvalidArgument
from .fileio import StreamHasher
from .s3io import error_code, http_status

if TYPE_CHECKING:
    from .s3blobs import S3BlobStore

PART_BYTES = 8 << 20  # S3's smallest part is 5 MiB (the last excepted)
PART_GROWTH_EVERY = 1000  # parts; then the part size doubles (S3 allows 10,000 parts)
MAX_COPY_BYTES = 5 << 30  # CopyObject's limit; larger objects are copied in parts
COPY_PART_BYTES = 1 << 30


class S3BlobWriter:
    """One blob on its way into the bucket (see the module docstring); ``discard()`` any
    time removes what was uploaded."""

    def __init__(
        self,
        store: S3BlobStore,
        segments: Sequence[tuple[str, int, int]] = (),
        sha256: str | None = None,
    ):
        self._store = store
        self._hasher = StreamHasher(segments)
        self._buffer = bytearray()
        declared = (sha256 or "").lower()
        valid = len(declared) == 64 and all(c in "0123456789abcdef" for c in declared)
        self.expected = declared if valid else None  # (a bad one is the upload's to refuse)
        # Where the parts go: the blob's own key when its sha256 is declared, else a temp key.
        self.temp_key = (
            store.key(self.expected) if self.expected else store._key(f"tmp/{uuid.uuid4().hex}")
        )
        self._upload_id: str | None = None
        self._parts: list[dict] = []
        self._in_flight: Future | None = None  # the last part, going up while the next fills
        self._temp_object = False  # the multipart upload was completed: delete the object
        self._ended = False

    @property
    def size(self) -> int:
        return self._hasher.size

    @property
    def sha256(self) -> str:
        return self._hasher.sha256

    @property
    def segment_sha256(self) -> dict[str, str]:
        return self._hasher.segment_sha256

    def write(self, data) -> int:
        return self.write_many([data])

    def write_many(self, buffers: list) -> int:
        """Hash and buffer the bytes; each full part goes up while the next one fills (one in
        flight: a write waits for the part before, and raises its error)."""
        n = 0
        for data in buffers:
            self._hasher.update(data)
            self._buffer += data
            n += memoryview(data).nbytes
        while len(self._buffer) >= self._part_size():
            part = self._part_size()
            with memoryview(self._buffer) as view:
                data = bytes(view[:part])
            del self._buffer[:part]
            self._send_part(data)
        return n

    def _part_size(self) -> int:
        return PART_BYTES << (len(self._parts) // PART_GROWTH_EVERY)

    def _send_part(self, data: bytes) -> None:
        """Start uploading ``data`` as the next part, once the one before is up."""
        self._wait_part()
        store = self._store
        if self._upload_id is None:
            with store.errors.calling(f"uploading a blob to {store.root}", writing=True):
                self._upload_id = store.client.create_multipart_upload(
                    Bucket=store.bucket, Key=self.temp_key
                )["UploadId"]
        part = {"PartNumber": len(self._parts) + 1, "ETag": None}
        self._parts.append(part)
        self._in_flight = store.part_uploads().submit(self._put_part, part, data)

    def _put_part(self, part: dict, data: bytes) -> None:
        store = self._store
        with store.errors.calling(f"uploading a blob to {store.root}", writing=True):
            part["ETag"] = store.client.upload_part(
                Bucket=store.bucket,
                Key=self.temp_key,
                UploadId=self._upload_id,
                PartNumber=part["PartNumber"],
                Body=data,
            )["ETag"]

    def _wait_part(self) -> None:
        """Wait for the part in flight; raises its error (``Unavailable``, ...)."""
        if self._in_flight is not None:
            future, self._in_flight = self._in_flight, None
            future.result()

    def publish(self) -> None:
        """Put the blob under its key (``S3BlobStore.commit`` calls this)."""
        assert not self._ended, "this blob writer has ended"
        store = self._store
        if self.expected is not None and self.sha256 != self.expected:
            raise InvalidArgument(
                f"blob's sha256 is {self.sha256}, {self.expected} was declared; the bytes "
                "were damaged in transit, send them again"
            )
        final = store.key(self.sha256)
        doing = f"storing blob {store.path(self.sha256)}"
        with store.errors.calling(doing, writing=True):
            self._wait_part()  # the part in flight is up (or its error raised)
            if self._upload_id is None:  # one part: put it under its key
                body = bytes(self._buffer)
                self._conditional(
                    lambda **c: store.client.put_object(
                        Bucket=store.bucket, Key=final, Body=body, **c
                    ),
                    final,
                )
            elif store.size(self.sha256) is not None:
                pass  # the same bytes are there already (held by the caller): discard below
            else:
                if self._buffer:
                    self._send_part(bytes(self._buffer))
                self._buffer = bytearray()
                self._wait_part()
                self._complete()
        self._ended = True
        self.discard()  # aborts an upload not completed, deletes the temp object

    def _complete(self) -> None:
        """Complete the multipart upload: under its key (conditionally) or under the temp
        key, then copied to its key."""
        store, final = self._store, self._store.key(self.sha256)

        def complete(**condition):
            store.client.complete_multipart_upload(
                Bucket=store.bucket,
                Key=self.temp_key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
                **condition,
            )

        if self.temp_key == final:
            if self._conditional(complete, final):
                self._upload_id = None
            return  # else (412) the upload is aborted by discard
        complete()
        self._upload_id, self._temp_object = None, True
        self._copy_to(final)

    def _copy_to(self, final: str) -> None:
        store, source = self._store, {"Bucket": self._store.bucket, "Key": self.temp_key}
        if self.size <= MAX_COPY_BYTES:
            self._conditional(
                lambda **c: store.client.copy_object(
                    Bucket=store.bucket, Key=final, CopySource=source, **c
                ),
                final,
            )
            return
        upload_id = store.client.create_multipart_upload(Bucket=store.bucket, Key=final)["UploadId"]
        try:
            parts = []
            for number, begin in enumerate(range(0, self.size, COPY_PART_BYTES), start=1):
                end = min(begin + COPY_PART_BYTES, self.size) - 1
                got = store.client.upload_part_copy(
                    Bucket=store.bucket,
                    Key=final,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource=source,
                    CopySourceRange=f"bytes={begin}-{end}",
                )
                parts.append({"PartNumber": number, "ETag": got["CopyPartResult"]["ETag"]})
            self._conditional(
                lambda **c: store.client.complete_multipart_upload(
                    Bucket=store.bucket,
                    Key=final,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    **c,
                ),
                final,
            )
        finally:
            try:
                store.client.abort_multipart_upload(
                    Bucket=store.bucket, Key=final, UploadId=upload_id
                )
            except ClientError:
                pass  # completed: there is nothing to abort

    def _conditional(self, call: Callable[..., object], final: str) -> bool:
        """``call`` with ``If-None-Match: *``; False when an object already under ``final``
        is kept (412). A store that does not support the condition (501) gets a HEAD
        first; the window between the two is then the caller's hold's to cover (same
        bytes anyway)."""
        for attempt in range(2):
            try:
                call(IfNoneMatch="*")
                return True
            except ClientError as err:
                status, code = http_status(err), error_code(err)
                if status == 412 or code == "PreconditionFailed":
                    return False  # the same bytes are there already: never overwritten
                if status == 409 and attempt == 0:
                    continue  # a concurrent conditional write of the same key: once more
                if status != 501 and code != "NotImplemented":
                    raise
            if self._store.size(self.sha256) is not None:
                return False
            call()
            return True
        return False

    def discard(self) -> None:
        """Abort the multipart upload, delete the temp object; safe to call more than once
        and after ``publish``. Best effort: if the store is down, ``cleanup`` removes them
        later."""
        self._ended = True
        self._buffer = bytearray()
        store = self._store
        if self._in_flight is not None:  # let it end (the client's timeouts bound it) first
            try:
                self._wait_part()
            except Exception:  # noqa: BLE001 - the write's own error is the one that counts
                pass
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                store.client.abort_multipart_upload(
                    Bucket=store.bucket, Key=self.temp_key, UploadId=upload_id
                )
            except Exception:  # noqa: BLE001 - left for cleanup: never mask the real error
                pass
        self._remove_temp()

    def _remove_temp(self) -> None:
        if self._temp_object:
            try:
                self._store.client.delete_object(Bucket=self._store.bucket, Key=self.temp_key)
                self._temp_object = False
            except Exception:  # noqa: BLE001 - left for cleanup (a temp object, by age)
                pass
