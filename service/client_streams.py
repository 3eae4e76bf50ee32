"""The client's two streams: an upload's chunks, checksummed as they are sent (one pass over
the file), and a download's watchdog, which cancels a stream that stops sending.

>>> call = stub.UploadVersion(checksummed_upload_chunks(path, header, progress))
>>> with Stall(call, timeout_s) as stall: ...  # stall.progress() on every chunk
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from paramserve.protos import registry_pb2 as pb
from paramserve.registry.fileio import Crc32c

UPLOAD_CHUNK_BYTES = 1 << 20
Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


class Stall:
    """Cancels a streaming ``call`` when ``progress()`` is not called for ``timeout_s``."""

    def __init__(self, call, timeout_s: float):
        self.call, self.timeout_s = call, timeout_s
        self.fired = False
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="paramserve-download-watch", daemon=True
        )

    def __enter__(self) -> Stall:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def progress(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while True:
            left = self._last + self.timeout_s - time.monotonic()
            if left <= 0:
                self.fired = True
                self.call.cancel()
                return
            if self._done.wait(left):
                return


def size_and_sha256(path: Path) -> tuple[int, str]:
    """One pass over a file for its header (old-style uploads, and the benchmark's floor)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def upload_chunks(
    path: Path, header: pb.UploadHeader, progress: Progress | None, digest=None
) -> Iterator[pb.UploadChunk]:
    """The header, then the file in chunks; each chunk also goes through ``digest`` (anything
    with an ``update(bytes)``) if given."""
    yield pb.UploadChunk(header=header)
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(UPLOAD_CHUNK_BYTES):
            if digest is not None:
                digest.update(chunk)
            done += len(chunk)
            yield pb.UploadChunk(data=chunk)
            if progress:
                progress(done, header.size_bytes)


def hashed_upload_chunks(
    path: Path, header: pb.UploadHeader, progress: Progress | None
) -> Iterator[pb.UploadChunk]:
    """One pass: the file is hashed as it is sent, and the sha256 follows in a trailer (what
    servers before ``UploadTrailer.crc32c`` need)."""
    digest = hashlib.sha256()
    yield from upload_chunks(path, header, progress, digest)
    yield pb.UploadChunk(trailer=pb.UploadTrailer(sha256=digest.hexdigest()))


def checksummed_upload_chunks(
    path: Path, header: pb.UploadHeader, progress: Progress | None
) -> Iterator[pb.UploadChunk]:
    """One pass: the file's CRC32C is computed as it is sent and follows in a trailer. The
    server computes the sha256 (the content address) itself, so the client does not: at
    ~3 GB/s a CRC32C costs about a third of a sha256, and it catches what damages bytes in
    transit."""
    crc = Crc32c()
    yield from upload_chunks(path, header, progress, crc)
    yield pb.UploadChunk(trailer=pb.UploadTrailer(crc32c=crc.value))
