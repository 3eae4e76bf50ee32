"""The object store's side of blob I/O: error translation and readers over S3 objects.

Every boto3 call of ``s3blobs`` runs inside ``S3Errors.calling``, which turns what the client
raises into the core's classes: an unreachable or failing object store is ``Unavailable``
naming the endpoint (and, for writes, that nothing was committed), a missing object
``DataLoss``, a missing bucket or credentials ``FailedPrecondition``. So no botocore exception
reaches the edge as an INTERNAL error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from .errors import DataLoss, FailedPrecondition, Unavailable

# 5xx and throttling: the service's state, not the request's fault.
_UNAVAILABLE_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


def error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def http_status(err: ClientError) -> int:
    return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def is_missing(err: ClientError) -> bool:
    return error_code(err) in _MISSING_CODES or http_status(err) == 404


class S3Errors:
    """Translates the errors of calls on one bucket of one endpoint."""

    def __init__(self, endpoint: str, bucket: str):
        self.endpoint, self.bucket = endpoint, bucket

    @contextmanager
    def calling(self, doing: str, writing: bool = False, missing: str | None = None):
        """Around boto3 calls that are ``doing`` something (``"reading blob s3://…"``).
        ``writing``: a failure says nothing was committed. ``missing``: what a 404 means
        (``DataLoss`` naming it); without it a 404 goes up as the ``ClientError`` it is."""
        after = (
            "; nothing was committed, retry when it is back"
            if writing
            else ("; retry when it is back")
        )
        try:
            yield
        except NoCredentialsError as err:
            raise FailedPrecondition(
                f"no credentials for the object store {self.endpoint}: set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile) for the server"
            ) from err
        except BotoCoreError as err:  # connection refused or reset, timeouts, a cut-off body
            raise Unavailable(
                f"object store {self.endpoint} (bucket {self.bucket!r}) is unreachable while "
                f"{doing}: {str(err)[:200]}{after}"
            ) from err
        except OSError as err:  # a socket error under a streamed body
            raise Unavailable(
                f"object store {self.endpoint} (bucket {self.bucket!r}) failed while "
                f"{doing}: {str(err)[:200]}{after}"
            ) from err
        except ClientError as err:
            code, status = error_code(err), http_status(err)
            if missing is not None and is_missing(err):
                raise DataLoss(
                    f"blob {missing} is missing; restore it from a backup or delete the "
                    "version that refers to it"
                ) from err
            if code == "NoSuchBucket":
                raise FailedPrecondition(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint}; create it "
                    "(or fix --blob-url)"
                ) from err
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise FailedPrecondition(
                    f"the object store {self.endpoint} refused {doing} ({code}); give the "
                    f"server credentials allowed to read and write bucket {self.bucket!r}"
                ) from err
            if status >= 500 or code in _UNAVAILABLE_CODES:
                raise Unavailable(
                    f"object store {self.endpoint} (bucket {self.bucket!r}) answered "
                    f"{status} {code} while {doing}{after}"
                ) from err
            raise


class _ReadsInto:
    """``readinto`` over ``read``: an object's body gives bytes, not a buffer to fill."""

    def read(self, size: int = -1) -> bytes:
        raise NotImplementedError

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(view.nbytes)
        view[: len(data)] = data
        return len(data)


class ObjectStream(_ReadsInto):
    """An object's body read front to back (``read``/``readinto``), errors translated."""

    def __init__(self, body, errors: S3Errors, doing: str, counter=None):
        self._body = body
        self._errors, self._doing = errors, doing
        self._counter = counter

    def read(self, size: int = -1) -> bytes:
        with self._errors.calling(self._doing):
            data = self._body.read(None if size is None or size < 0 else size)
        if self._counter is not None:
            self._counter(len(data))
        return data

    def close(self) -> None:
        self._body.close()


class RangedObject(_ReadsInto):
    """A stored object read in ranges: each read is one ranged GET of exactly the bytes it
    returns, so reading one tensor fetches the header and that tensor only."""

    def __init__(
        self, client, bucket: str, key: str, size: int, errors: S3Errors, label: str, counter=None
    ):
        self._client, self._bucket, self._key = client, bucket, key
        self.size_bytes = size
        self._errors, self._label = errors, label
        self._counter = counter
        self._position = 0

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: self.size_bytes}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        end = self.size_bytes if size is None or size < 0 else self._position + size
        end = min(end, self.size_bytes)
        if end <= self._position:
            return b""
        with self._errors.calling(f"reading {self._label}", missing=self._label):
            body = self._client.get_object(
                Bucket=self._bucket, Key=self._key, Range=f"bytes={self._position}-{end - 1}"
            )["Body"]
            try:
                data = body.read()
            finally:
                body.close()
        if self._counter is not None:
            self._counter(len(data))
        self._position += len(data)
        return data

    def close(self) -> None:
        """Nothing to release: each read is its own ranged GET."""

    def __enter__(self) -> RangedObject:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def paginate(client, operation: str, errors: S3Errors, doing: str, **kwargs) -> Iterator[dict]:
    """The pages of a listing, errors translated."""
    with errors.calling(doing):
        yield from client.get_paginator(operation).paginate(**kwargs)
