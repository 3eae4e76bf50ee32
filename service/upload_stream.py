"""The server's side of an ``UploadVersion`` stream: the protocol, the size limit, the hand-off.

A stream is one header, the data chunks, and a trailer carrying the sha256 when the header has
none (a client that hashes while it sends), or a CRC32C of the bytes instead (a client that
leaves the sha256 to the server, which computes it in any case: one cryptographic pass, not
two). The chunks go to the core's ``StreamedUpload``,
which hashes and writes them, in the worker pool. The first bytes are awaited one by one (they
pick the path and may refuse the upload at once); after that the chunks go in batches: while
one batch is written the next chunks are received. At most ``MAX_PENDING_BYTES`` wait; then
the stream waits too, so gRPC flow control slows the client and memory stays flat whatever
the upload's size. A client that sends nothing for ``idle_s`` seconds ends its upload with
DEADLINE_EXCEEDED (``StreamIdle``), its temp file removed: it is the server's deadline that
passed, not a cancellation the client asked for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from paramserve.protos import registry_pb2 as pb
from paramserve.registry import Store
from paramserve.registry.errors import InvalidArgument, ResourceExhausted
from paramserve.registry.uploads import StreamedUpload
from paramserve.registry.values import VersionInfo

from .batcher import DeadlineExceeded

MAX_PENDING_BYTES = 2 << 20
RunBlocking = Callable[..., Awaitable]


class StreamIdle(DeadlineExceeded):
    """The client sent nothing for ``--stream-idle-timeout-s``."""


async def receive_upload(
    chunks,
    store: Store,
    run_blocking: RunBlocking,
    spool_dir: str,
    max_upload_bytes: int,
    idle_s: float = 0.0,
    author: str = "",
) -> tuple[VersionInfo, int]:
    """Read the stream and store it as a version; returns it and the bytes received.

    Any error (a lie in the stream, a bad state_dict, a cancelled call, ``idle_s`` seconds
    without a message) ends the upload with nothing stored and no temp file left.
    """
    header, sha256, crc32c, trailer_seen = None, "", None, False
    upload: StreamedUpload | None = None
    batches: _Batches | None = None
    try:
        async for chunk in _until_idle(chunks, idle_s):
            kind = chunk.WhichOneof("kind")
            if kind == "header":
                if header is not None:
                    raise InvalidArgument(
                        "upload stream has two headers; send one header, then data chunks"
                    )
                header, sha256 = chunk.header, chunk.header.sha256.lower()
                _check_header(header, max_upload_bytes)
                upload = await run_blocking(
                    store.begin_upload,
                    header.model,
                    header.size_bytes,
                    header.alias or None,
                    spool_dir,
                    sha256 or None,
                    provenance={"file": header.file_name} if header.file_name else None,
                    note=header.note,
                    author=author,
                )
                batches = _Batches(run_blocking, upload.write)
            elif header is None:
                raise InvalidArgument(
                    "upload stream must start with a header naming the model and the size"
                )
            elif trailer_seen:
                raise InvalidArgument(
                    "upload stream goes on after its trailer; the trailer comes last"
                )
            elif kind == "trailer":
                trailer_seen = True
                if chunk.trailer.sha256 or not chunk.trailer.HasField("crc32c"):
                    sha256 = _trailer_sha256(chunk.trailer, sha256)
                if chunk.trailer.HasField("crc32c"):
                    crc32c = chunk.trailer.crc32c
            else:
                assert upload is not None and batches is not None  # set with the header
                data = chunk.data  # read once: each access copies the bytes
                if upload.decided:
                    await batches.add(data)
                elif data:  # the first bytes may refuse the upload: hear it now, not at the end
                    await run_blocking(upload.write, [data])
        if header is None:
            raise InvalidArgument("empty upload stream: send a header, then the bytes")
        assert upload is not None and batches is not None  # set with the header
        await batches.flush()
        if not sha256 and crc32c is None:
            raise InvalidArgument(
                "upload stream has no sha256: put it in the header, or send "
                "a trailer after the last data chunk (with the sha256 or a crc32c)"
            )
        version = await run_blocking(upload.finish, sha256, crc32c)
        upload = None
        return version, header.size_bytes
    finally:
        if upload is not None:  # waits for a write in flight, then removes what was written
            await asyncio.shield(run_blocking(upload.abort))


async def _until_idle(chunks, idle_s: float):
    """``chunks``, or ``StreamIdle`` when the next one takes more than ``idle_s`` (0: no
    limit). Only the wait for the client counts, not the server's own writes."""
    iterator = aiter(chunks)
    while True:
        try:
            async with asyncio.timeout(idle_s or None):
                chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise StreamIdle(
                f"upload stream sent nothing for {idle_s:g} s, the server's limit "
                "(--stream-idle-timeout-s); nothing was stored"
            ) from None
        yield chunk


def _check_header(header: pb.UploadHeader, max_upload_bytes: int) -> None:
    if header.size_bytes < 0 or (header.sha256 and not _is_sha256(header.sha256)):
        raise InvalidArgument(
            "upload header needs size_bytes >= 0 and either a "
            "64-hex-digit sha256 or none (then send it in a trailer)"
        )
    if max_upload_bytes and header.size_bytes > max_upload_bytes:
        raise ResourceExhausted(
            f"upload of {header.size_bytes} bytes is over the server's "
            f"limit of {max_upload_bytes} (--max-upload-mb)"
        )


def _trailer_sha256(trailer: pb.UploadTrailer, from_header: str) -> str:
    given = trailer.sha256.lower()
    if not _is_sha256(given):
        raise InvalidArgument("upload trailer needs a 64-hex-digit sha256")
    if from_header and given != from_header:
        raise InvalidArgument(
            f"upload trailer's sha256 {given} differs from the header's "
            f"{from_header}; send one of them"
        )
    return given


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)


class _Batches:
    """Chunks handed to a blocking ``write(chunks)`` in the worker pool, one batch at a time."""

    def __init__(self, run_blocking: RunBlocking, write: Callable[[list[bytes]], None]):
        self._run, self._write = run_blocking, write
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._in_flight: asyncio.Future | None = None

    async def add(self, data: bytes) -> None:
        """Queue ``data``; start a batch when the writer is free, wait when too much waits."""
        if not data:
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._in_flight is not None:
            if not self._in_flight.done() and self._pending_bytes < MAX_PENDING_BYTES:
                return
            await self._in_flight  # raises what the writer raised
        self._start()

    async def flush(self) -> None:
        """Wait until every queued chunk is written."""
        if self._in_flight is not None:
            await self._in_flight
        if self._pending:
            await self._start()

    def _start(self) -> asyncio.Future:
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        future = self._in_flight = asyncio.ensure_future(self._run(self._write, batch))
        # An upload that fails elsewhere may never await this one; its error is not news.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future
