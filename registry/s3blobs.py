"""Blobs in S3-compatible object storage: ``--blob-url s3://BUCKET/PREFIX``.

Keys: ``PREFIX/sha256/ab/<sha256>.safetensors``, as the local directory lays files out. The
endpoint comes from ``--s3-endpoint-url`` (non-AWS services: SeaweedFS, MinIO, …); region
and credentials from boto3's default chain (``AWS_*`` variables, ``~/.aws`` files, a role).

Writing (``S3BlobWriter``): the bytes are hashed as they arrive and go up in parts (8 MiB,
growing for huge blobs), one part going up while the next fills: two parts in memory at most,
never the whole blob. The key is the sha256, known only at the end, so:

- a blob that fits in one part is put under its key at once, when committed;
- a larger one whose sha256 the client declared up front (an upload header's) streams as a
  multipart upload to its key, completed only once the streamed hash matches;
- any other streams as a multipart upload to ``PREFIX/tmp/<uuid>``; committing completes it
  and copies it, server-side, to its key, then deletes the temp object. (When the key exists
  already the upload is aborted instead: no copy.)

Either way the final write is conditional (``If-None-Match: *``): **an existing key is never
overwritten**. When one is there already (the same bytes, under their sha256) the new copy is
dropped and the existing object, held by the caller (``gc``), is used. A failed or cancelled
write aborts its multipart upload and deletes its temp object; what a killed process leaves
(an unfinished upload, a temp object) is a ``Temporary`` that ``cleanup`` (at start, older
than an hour) and ``paramserve check --repair`` remove by age.

Reading: ``open`` streams the object's body and checks its sha256 at the end (``DataLoss``);
``open_raw`` reads ranges (``Range: bytes=``), one GET per read, for single tensors.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from .blobs import VerifyingReader
from .blobstore import BlobRef, Temporary, write_blob
from .errors import InvalidArgument
from .s3io import ObjectStream, RangedObject, S3Errors, http_status, paginate
from .s3write import PART_BYTES, S3BlobWriter

__all__ = ["PART_BYTES", "STALE_S", "S3BlobStore", "S3BlobWriter"]

STALE_S = 3600.0  # an unfinished write this old (no new part) is a dead process's
PART_THREADS = 16  # parts going up at once, one per writer


class S3BlobStore:
    """Content-addressed blobs under ``s3://BUCKET/PREFIX``."""

    def __init__(self, url: str, endpoint_url: str | None = None, client=None):
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise InvalidArgument(f"--blob-url {url[:200]!r}: write s3://BUCKET/PREFIX")
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.root = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.endpoint = endpoint_url or "AWS S3"
        self.errors = S3Errors(self.endpoint, self.bucket)
        self.bytes_fetched = 0  # object bytes read so far (all reads): for tests and metrics
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self.client = client or boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(
                connect_timeout=5,
                read_timeout=60,
                retries={"mode": "standard", "max_attempts": 3},
                max_pool_connections=32,
                # Every full read is checked against the blob's sha256 and every ranged one
                # against its tensor's: a CRC of the response on top is CPU for nothing.
                # (Uploads keep boto3's checksums: they guard the parts in transit.)
                response_checksum_validation="when_required",
                s3={"addressing_style": "path"} if endpoint_url else None,
            ),
        )
        with self.errors.calling(f"opening bucket {self.bucket!r}"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as err:
                if http_status(err) == 404:
                    err.response["Error"]["Code"] = "NoSuchBucket"
                raise

    # ---- keys ---------------------------------------------------------------------------

    def _key(self, tail: str) -> str:
        return f"{self.prefix}/{tail}" if self.prefix else tail

    def key(self, sha256: str) -> str:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self._key(f"sha256/{sha256[:2]}/{sha256}.safetensors")

    def path(self, sha256: str) -> str:
        return f"s3://{self.bucket}/{self.key(sha256)}"

    def _count(self, n: int) -> None:
        self.bytes_fetched += n

    # ---- the interface ------------------------------------------------------------------

    def exists(self, sha256: str) -> bool:
        return self.size(sha256) is not None

    def size(self, sha256: str) -> int | None:
        """The blob's size, or ``None`` when there is none."""
        with self.errors.calling(f"looking up {self.path(sha256)}"):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))
            except ClientError as err:
                if http_status(err) == 404:
                    return None
                raise
        return int(head["ContentLength"])

    def create(
        self, segments: Sequence[tuple[str, int, int]] = (), sha256: str | None = None
    ) -> S3BlobWriter:
        """``sha256``: the digest the bytes must have, when known before they arrive; the
        multipart upload then goes straight to its key (no copy)."""
        return S3BlobWriter(self, segments, sha256)

    def commit(self, writer: S3BlobWriter) -> BlobRef:
        """Publish the writer's blob under its sha256, never over an existing object (then
        that one, the same bytes, stays). The caller holds the blob (``gc``). On any failure
        nothing is published and what was uploaded is removed."""
        try:
            writer.publish()
        except BaseException:
            writer.discard()
            raise
        return BlobRef(writer.sha256, writer.size)

    def write(self, produce: Callable[[S3BlobWriter], None]) -> BlobRef:
        return write_blob(self, produce)

    def open(self, sha256: str) -> VerifyingReader:
        """The whole object streamed; ``finish()`` checks its sha256."""
        label = self.path(sha256)
        with self.errors.calling(f"reading {label}", missing=label):
            got = self.client.get_object(Bucket=self.bucket, Key=self.key(sha256))
        stream = ObjectStream(got["Body"], self.errors, f"reading {label}", self._count)
        return VerifyingReader(stream, sha256, label, size_bytes=int(got["ContentLength"]))

    def open_raw(self, sha256: str) -> RangedObject:
        label = self.path(sha256)
        size = self.size(sha256)
        if size is None:
            with self.errors.calling(f"reading {label}", missing=label):
                raise ClientError({"Error": {"Code": "NoSuchKey"}}, "HeadObject")
        return RangedObject(
            self.client, self.bucket, self.key(sha256), size, self.errors, label, self._count
        )

    def verify(self, sha256: str) -> None:
        with self.open(sha256) as reader:
            reader.finish()

    def delete(self, sha256: str) -> None:
        with self.errors.calling(f"deleting {self.path(sha256)}"):
            self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))

    def list_blobs(self) -> Iterator[tuple[str, str]]:
        pages = paginate(
            self.client,
            "list_objects_v2",
            self.errors,
            "listing blobs",
            Bucket=self.bucket,
            Prefix=self._key("sha256/"),
        )
        for page in pages:
            for item in page.get("Contents", []):
                name = item["Key"].rsplit("/", 1)[-1]
                if name.endswith(".safetensors"):
                    yield name.split(".")[0], f"s3://{self.bucket}/{item['Key']}"

    def temporaries(self) -> list[Temporary]:
        """Unfinished multipart uploads and temp objects under the prefix, aged by their
        last activity (a live upload adds a part every few seconds)."""
        now = dt.datetime.now(dt.UTC)
        out = []
        uploads = (  # our own keys only: a bucket (or an empty prefix) may hold others'
            page
            for tail in ("tmp/", "sha256/")
            for page in paginate(
                self.client,
                "list_multipart_uploads",
                self.errors,
                "listing unfinished uploads",
                Bucket=self.bucket,
                Prefix=self._key(tail),
            )
        )
        for page in uploads:
            for upload in page.get("Uploads", []):
                key, upload_id = upload["Key"], upload["UploadId"]
                last = max([upload["Initiated"], *self._part_times(key, upload_id)])
                label = f"s3://{self.bucket}/{key} (unfinished multipart upload {upload_id})"
                out.append(
                    Temporary(label, (now - last).total_seconds(), ("upload", key, upload_id))
                )
        objects = paginate(
            self.client,
            "list_objects_v2",
            self.errors,
            "listing temp objects",
            Bucket=self.bucket,
            Prefix=self._key("tmp/"),
        )
        for page in objects:
            for item in page.get("Contents", []):
                age_s = (now - item["LastModified"]).total_seconds()
                out.append(
                    Temporary(
                        f"s3://{self.bucket}/{item['Key']}", age_s, ("object", item["Key"], None)
                    )
                )
        return out

    def _part_times(self, key: str, upload_id: str) -> list[dt.datetime]:
        try:
            pages = list(
                paginate(
                    self.client,
                    "list_parts",
                    self.errors,
                    "listing parts",
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                )
            )
        except ClientError:  # finished or aborted since it was listed
            return []
        return [part["LastModified"] for page in pages for part in page.get("Parts", [])]

    def remove_temporary(self, temporary: Temporary) -> None:
        kind, key, upload_id = temporary.handle
        with self.errors.calling(f"removing {temporary.label}"):
            try:
                if kind == "upload":
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id
                    )
                else:
                    self.client.delete_object(Bucket=self.bucket, Key=key)
            except ClientError as err:
                if http_status(err) != 404:  # gone already: finished, or removed by a peer
                    raise

    def cleanup(self, min_age_s: float = STALE_S) -> list[str]:
        """Remove the temporaries older than ``min_age_s``: those of killed processes (one
        that fails removes its own). Returns their labels."""
        removed = []
        for temporary in self.temporaries():
            if temporary.age_s >= min_age_s:
                self.remove_temporary(temporary)
                removed.append(temporary.label)
        return removed

    def part_uploads(self) -> ThreadPoolExecutor:
        """The threads that upload parts while writers fill the next (one part per writer)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(PART_THREADS, thread_name_prefix="paramserve-s3")
            return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()
