"""Content-addressed blob files: ``<root>/sha256/ab/<sha256>.safetensors``.

A blob is written to ``<root>/tmp/`` (by a ``HashingWriter``: one pass), fsynced, then
renamed into place, so a crash leaves either no blob or a whole one, never a partial file under
a content address. Readers hash while they read; a blob whose bytes no longer match its name is
reported as ``DataLoss``.

A blob that already exists is replaced by the new, hashed file rather than kept: the bytes are
the same when the old file is sound (readers holding it open keep their inode), and a damaged
old file (same size, other bytes) is healed instead of being served under the new version.
Checking the old file's hash instead would read the whole blob a second time.

This class only moves files. *When* a blob may be deleted is decided by ``gc.BlobCollector``,
ordered with uploads through the database. It is the default of the ``blobstore.Blobs``
interface; ``s3blobs.S3BlobStore`` is the other.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .blobstore import BlobRef, Temporary, write_blob
from .errors import DataLoss
from .fileio import WRITEBACK_STEP_BYTES, HashingWriter, disk_full_is_resource_exhausted

TEMP_SUFFIX = ".partial"

__all__ = ["TEMP_SUFFIX", "BlobRef", "BlobStore", "VerifyingReader"]


class BlobStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "sha256").mkdir(exist_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / f"{sha256}.safetensors"

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def create(
        self, segments: Sequence[tuple[str, int, int]] = (), sha256: str | None = None
    ) -> HashingWriter:
        """A new temp file for one blob; finish it with ``commit`` or ``discard()``.
        ``segments``: the tensors' byte ranges, each hashed on its own as well. ``sha256``
        (a declared digest) is not needed here: the file is named once it is written."""
        return HashingWriter(
            self.tmp_dir / f"{uuid.uuid4().hex}{TEMP_SUFFIX}", writeback=True, segments=segments
        )

    def commit(self, writer: HashingWriter) -> BlobRef:
        """fsync the writer's temp file and rename it to its content address (replacing a
        file already there: see the module's docstring).

        On any failure the temp file is removed and nothing appears in the store. The caller
        must hold the blob (``gc.BlobCollector.hold``) so that no collection removes it before
        a version row refers to it.
        """
        try:
            writer.sync()
            sha256, size = writer.sha256, writer.size
            final = self.path(sha256)
            with disk_full_is_resource_exhausted(final):
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(writer.path, final)
                _fsync_dir(final.parent)
        except BaseException:
            writer.discard()
            raise
        return BlobRef(sha256, size)

    def write(self, produce: Callable[[HashingWriter], None]) -> BlobRef:
        """Run ``produce(writer)`` on a new temp file and move the result into place.

        If ``produce`` raises, the temp file is removed and nothing appears in the store.
        """
        return write_blob(self, produce)

    def open(self, sha256: str) -> VerifyingReader:
        """Open a blob for one sequential read; call ``finish()`` after the last byte."""
        return VerifyingReader(self.open_raw(sha256), sha256, self.path(sha256))

    def open_raw(self, sha256: str) -> io.BufferedReader:
        """Open a blob for ranged reads (nothing is verified: check what you read)."""
        path = self.path(sha256)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise DataLoss(
                f"blob {path} is missing; restore it from a backup or delete the "
                "version that refers to it"
            ) from None

    def verify(self, sha256: str) -> None:
        """Hash the whole blob; raises ``DataLoss`` when it does not match its name."""
        with self.open(sha256) as reader:
            while reader.read(8 << 20):
                pass
            reader.finish()

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def list_blobs(self) -> Iterator[tuple[str, str]]:
        """``(sha256, path)`` of every blob file (temp files apart), in path order."""
        for path in sorted((self.root / "sha256").rglob("*.safetensors")):
            yield path.name.split(".")[0], str(path)

    def temporaries(self) -> list[Temporary]:
        """The temp files of writes in flight (or of crashed ones), with their ages."""
        out, now = [], time.time()
        for path in sorted(self.tmp_dir.glob(f"*{TEMP_SUFFIX}")) if self.tmp_dir.is_dir() else []:
            try:
                age_s = now - path.stat().st_mtime
            except FileNotFoundError:  # an upload finished (or its writer cleaned up) since
                continue
            out.append(Temporary(str(path), age_s, path))
        return out

    def remove_temporary(self, temporary: Temporary) -> None:
        Path(temporary.handle).unlink(missing_ok=True)

    def close(self) -> None:
        """Nothing to release (the interface's: an object store closes its connections)."""


class VerifyingReader:
    """A read-only file that hashes what passes through it and checks the digest at the end."""

    def __init__(self, file, sha256: str, path, size_bytes: int | None = None):
        """``size_bytes``: the blob's size when ``file`` has no descriptor (an object's body)."""
        self._file = file
        self._digest = hashlib.sha256()
        self.sha256 = sha256
        self.path = path
        self.size_bytes = os.fstat(file.fileno()).st_size if size_bytes is None else size_bytes
        self._read = 0
        self._dropped: int | None = None  # drop_behind's: page cache dropped for [0, _dropped)

    def drop_behind(self) -> None:
        """Drop the file's pages from the page cache behind the reader, a step at a time (a
        download: read once, front to back). Reading a large uncached blob then reuses the
        pages just freed instead of taking fresh ones, which is what costs on these VMs
        (``fileio``'s docstring): measured for 1 GiB, ~1.4 s of the server's system time.
        The price is Writeback's: the blob is not cached afterwards. Only for a local file."""
        if not hasattr(os, "posix_fadvise"):  # Linux has it; macOS, Windows: nothing to do
            return
        try:
            fd = self._file.fileno()
        except (AttributeError, OSError):
            return
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self._dropped = 0

    def _advance(self, n: int) -> None:
        self._read += n
        if self._dropped is not None and self._read - self._dropped >= WRITEBACK_STEP_BYTES:
            os.posix_fadvise(
                self._file.fileno(),
                self._dropped,
                self._read - self._dropped,
                os.POSIX_FADV_DONTNEED,
            )
            self._dropped = self._read

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._digest.update(data)
        self._advance(len(data))
        return data

    def readinto(self, buffer) -> int:
        got = self._file.readinto(buffer)
        if got:
            self._digest.update(memoryview(buffer)[:got])
            self._advance(got)
        return got

    def seek(self, offset: int, whence: int = 0) -> int:
        raise OSError("VerifyingReader reads sequentially only")

    def finish(self) -> None:
        """Hash whatever was not read yet and compare with the blob's name."""
        while self.read(8 << 20):
            pass
        if self._digest.hexdigest() != self.sha256:
            raise DataLoss(
                f"blob {self.path} is corrupt: its sha256 is "
                f"{self._digest.hexdigest()}, expected {self.sha256}; restore it "
                "from a backup or delete the version that refers to it"
            )

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
