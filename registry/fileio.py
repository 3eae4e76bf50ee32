"""Files written once, front to back, and hashed on the way: blobs and upload spools.

What makes a large write cheap here is the memory it lands in, not the disk. Measured on the
2-core VM for 1 GiB: writing into fresh page-cache pages costs ~2 s of system time (the guest's
free memory is handed back to the host, and touching it again is slow), into pages freed a
moment ago ~0.2 s; a final fsync costs ~0.3 s. ``Writeback`` therefore writes blobs to disk
behind the writer and recycles their pages. Reserving blocks up front (fallocate) made no
measurable difference, so files are not preallocated: an announced size reserves no disk.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import google_crc32c

from .errors import ResourceExhausted

SYNC_FILE_RANGE_WRITE = 0x02
SYNC_FILE_RANGE_ALL = 0x01 | 0x02 | 0x04  # wait before, write, wait after
WRITEBACK_STEP_BYTES = 32 << 20
IOV_MAX = 1024
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
PARALLEL_HASH_BYTES = 256 << 10  # a batch this large hashes its segments in a helper thread


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.sync_file_range.argtypes = [
            ctypes.c_int,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_uint,
        ]
        return libc
    except (OSError, AttributeError):  # not Linux, or a libc without these calls
        return None


_LIBC = _libc()

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_FREED_BYTES = 32 << 20  # freed heap memory kept for the next allocations
HEAP_BELOW_BYTES = 4 << 20  # allocations under this come from the heap, not their own mmap
_kept = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep and reuse the memory of freed transfer buffers (once per
    process; False where there is no glibc).

    A transfer allocates and frees megabyte buffers at a high rate (each gRPC message, its
    protobuf copy, each chunk read). By default glibc returns such memory to the kernel at once
    (an ``munmap``, or trimming the heap top past 2 MiB), so the next buffer lands in fresh
    pages, and on this VM first touching a page is what costs (see the module's docstring):
    measured for 1 GiB, it took the server's system time from ~1.3 s to ~0.7 s for an upload
    and from ~3.2 s to ~0.9 s for a download, and the client's from ~2.2 s to ~0.8 s for a
    download. Here allocations under ``HEAP_BELOW_BYTES`` come from the heap and up to
    ``KEEP_FREED_BYTES`` of freed heap stay with the process: a bounded amount of RSS kept,
    not a growth per transfer. Larger allocations (tensors) are mmapped and unmapped as before.
    """
    global _kept
    if _kept:
        return True
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is None:
        return False
    _kept = bool(mallopt(M_MMAP_THRESHOLD, HEAP_BELOW_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
    )
    return _kept


class Writeback:
    """Writes a file to disk behind its writer (Linux ``sync_file_range``; elsewhere nothing).

    Every ``step`` bytes it starts writeback of the new step without waiting for it, then
    waits for the step before (long since under way) and drops its pages from the page cache.
    So the final fsync has little left to do, a file of any size holds about two steps of
    page cache, and the next writes land in the pages just freed (cheap, see above). The
    price: the file is not cached afterwards (its first reader reads the disk), and the writer
    waits when the disk is slower than the bytes arrive (backpressure, not buffering).
    """

    def __init__(self, fd: int, step: int = WRITEBACK_STEP_BYTES):
        self.fd, self.step = fd, step
        self.started = 0  # writeback started for [0, started)
        self.dropped = 0  # on disk and out of the page cache: [0, dropped)

    def advance(self, written: int) -> None:
        """Tell it ``written`` bytes are in the file; acts on whole steps only."""
        if _LIBC is None or written - self.started < self.step:
            return
        end = written - written % self.step
        _LIBC.sync_file_range(self.fd, self.started, end - self.started, SYNC_FILE_RANGE_WRITE)
        self.started = end
        done = end - self.step
        if done > self.dropped:
            _LIBC.sync_file_range(self.fd, self.dropped, done - self.dropped, SYNC_FILE_RANGE_ALL)
            os.posix_fadvise(self.fd, self.dropped, done - self.dropped, os.POSIX_FADV_DONTNEED)
            self.dropped = done


def write_all(fd: int, buffers: list) -> int:
    """``os.writev`` until every byte of ``buffers`` is written; returns the byte count."""
    views = [v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes]
    total = sum(v.nbytes for v in views)
    while views:
        done = os.writev(fd, views[:IOV_MAX])  # it may write fewer bytes than given
        while views and done >= views[0].nbytes:
            done -= views.pop(0).nbytes
        if done:
            views[0] = views[0][done:]
    return total


@contextmanager
def disk_full_is_resource_exhausted(path: Path) -> Iterator[None]:
    """ENOSPC / EDQUOT while writing under ``path`` → ``ResourceExhausted`` saying where."""
    try:
        yield
    except OSError as err:
        if err.errno not in DISK_FULL_ERRNOS:
            raise
        what = "disk is full" if err.errno == errno.ENOSPC else "disk quota is exhausted"
        raise ResourceExhausted(
            f"the {what}: cannot write {path}; free space on the volume of {path.parent} and retry"
        ) from err


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _segment_pool() -> ThreadPoolExecutor:
    """The helper threads that hash segments beside a writer (one per core at most)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=os.cpu_count() or 1, thread_name_prefix="paramserve-hash"
            )
        return _pool


class Crc32c:
    """A running CRC32C (Castagnoli) with hashlib's ``update``: the upload's transport check,
    computed by the client as it sends and by the server as it receives."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data) -> None:
        self.value = google_crc32c.extend(self.value, data)


class StreamHasher:
    """The sha256 of a byte stream fed front to back, and of named byte ranges of it.

    ``segments``: ``(name, begin, end)`` ranges, in stream order, each hashed on its own too
    (a blob's tensors: a ranged read of one tensor is checked against its own digest).
    """

    def __init__(self, segments: Sequence[tuple[str, int, int]] = ()):
        self.size = 0
        self._digest = hashlib.sha256()
        self._segments = list(segments)
        self._segment_digests = [hashlib.sha256() for _ in self._segments]
        self._segment_index = 0

    def update(self, data) -> None:
        """Feed the next bytes (bytes or any buffer)."""
        self._digest.update(data)
        view = memoryview(data).cast("B")
        if self._segments:
            self._hash_segments(view, self.size)
        self.size += view.nbytes

    def update_many(self, buffers: list, meanwhile: Callable[[], int] | None = None) -> int:
        """Feed ``buffers`` in order and run ``meanwhile()`` (a write of them); returns what
        it returns (else the byte count).

        With segments and a batch of at least ``PARALLEL_HASH_BYTES``, the segments' digests
        are computed in a helper thread while this one computes the whole stream's and runs
        ``meanwhile``: hashlib and writes release the GIL, so the two digests of a blob's
        bytes (its content address, its tensors') take two cores instead of adding up on one.
        Either way each digest sees each byte once, in order."""
        views = [v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes]
        total = sum(v.nbytes for v in views)
        future = None
        if self._segments and total >= PARALLEL_HASH_BYTES:
            future = _segment_pool().submit(self._hash_segments_many, views, self.size)
        elif self._segments:
            self._hash_segments_many(views, self.size)
        try:
            for view in views:
                self._digest.update(view)
            done = meanwhile() if meanwhile is not None else total
        finally:
            if future is not None:
                future.result()  # also when meanwhile failed: no thread touches us afterwards
        self.size += total
        return done

    def _hash_segments_many(self, views: list[memoryview], position: int) -> None:
        for view in views:
            self._hash_segments(view, position)
            position += view.nbytes

    def _hash_segments(self, view: memoryview, position: int) -> None:
        """Feed the bytes of ``view`` (at stream offset ``position``) to the segments they
        overlap."""
        start, end_of_view = 0, view.nbytes
        segments, i = self._segments, self._segment_index
        while i < len(segments) and start < end_of_view:
            _, begin, end = segments[i]
            at = position + start
            if at >= end:
                i += 1
            elif at < begin:
                start = min(end_of_view, begin - position)
            else:
                stop = min(end_of_view, end - position)
                self._segment_digests[i].update(view[start:stop])
                start = stop
        self._segment_index = i

    @property
    def sha256(self) -> str:
        """The hex digest of everything fed so far."""
        return self._digest.hexdigest()

    @property
    def segment_sha256(self) -> dict[str, str]:
        """Segment name → hex digest of its bytes (complete once the stream is fed)."""
        return {
            name: d.hexdigest() for (name, _, _), d in zip(self._segments, self._segment_digests)
        }


class HashingWriter:
    """A new file written sequentially and hashed as the bytes arrive, in one pass.

    ``writeback``: write it to disk behind the writer (``Writeback``), for files that will be
    fsynced (blobs); not for spools that are read back at once. ``segments``: named byte
    ranges ``(name, begin, end)`` of the file, in file order, each hashed on its own too
    (``StreamHasher``).
    """

    def __init__(
        self, path: Path, writeback: bool = False, segments: Sequence[tuple[str, int, int]] = ()
    ):
        self.path = Path(path)
        self.size = 0
        self._hasher = StreamHasher(segments)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        with disk_full_is_resource_exhausted(self.path):
            self._fd = os.open(self.path, flags, 0o644)
        self._writeback = Writeback(self._fd) if writeback else None

    def write(self, data) -> int:
        """Append ``data`` (bytes or any buffer) and hash it; returns its length, as files do."""
        return self.write_many([data])

    def write_many(self, buffers: list) -> int:
        """Append several buffers with one system call; returns how many bytes that was.

        One call per batch, not per chunk: each call gives up the GIL and must win it back
        from the event loop, which holds it while it receives the next chunks. The write
        runs while the segments are hashed (``StreamHasher.update_many``).
        """

        def write() -> int:
            with disk_full_is_resource_exhausted(self.path):
                n = write_all(self._fd, buffers)
                self.size += n
                if self._writeback is not None:
                    self._writeback.advance(self.size)
            return n

        return self._hasher.update_many(buffers, write)

    @property
    def sha256(self) -> str:
        """The hex digest of everything written so far."""
        return self._hasher.sha256

    @property
    def segment_sha256(self) -> dict[str, str]:
        """Segment name → hex digest of its bytes (complete once the file is written)."""
        return self._hasher.segment_sha256

    def sync(self) -> None:
        """fsync and close: the bytes are on disk."""
        with disk_full_is_resource_exhausted(self.path):
            os.fsync(self._fd)
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def discard(self) -> None:
        """Close and remove the file; safe to call more than once, and after a rename."""
        self.close()
        self.path.unlink(missing_ok=True)
