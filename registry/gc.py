"""Blob garbage collection, ordered with uploads across threads, processes and replicas.

Content addressing lets two versions (of any models) share one blob file, so a blob may be
deleted only when nothing refers to it, and "nothing" must include an upload that has placed
the file but not yet committed its version row. The order that makes this safe:

- an upload first **holds** the blob (a ``blob_holds`` row, committed under the blob's lock),
  then moves its file into place (``BlobStore.commit`` always writes its own, fresh file; the
  object store's ``S3BlobStore.commit`` writes its own unless the key exists, and never over
  it: the existing object is then the upload's, already held), then inserts its version row
  and drops the hold in one transaction (``publish``);
- a collection runs in **one** write transaction holding the same lock: it checks, in one
  statement, that no version row and no hold names the blob, unlinks the file, then commits.

Either the hold commits first (the collector sees it and keeps the file) or the collection
commits first (its unlink is done before the upload places its file). The database is what
replicas share, so this holds across them for either blob store; an object store deletes
inside the collection's transaction as the directory unlinks (S3's reads after a delete or a
write are consistent). A hold older than
``STALE_HOLD_S`` is a crashed writer's and ``paramserve check --repair`` removes it. A blob
the object store cannot delete now (it is unreachable) is left as an orphan, for the same
repair: the version's deletion, or the failed upload's own error, is not undone by it.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable

from .blobstore import BlobRef, Blobs, BlobWriter
from .errors import Unavailable
from .repository import Repository
from .schema import utcnow
from .values import VersionInfo

log = logging.getLogger("paramserve")

STALE_HOLD_S = 3600.0  # an upload takes well under a second from hold to row; an hour is dead

Insert = Callable[[BlobRef, int], "tuple[VersionInfo, bool]"]


class BlobCollector:
    def __init__(self, repository: Repository, blobs: Blobs):
        self.repository = repository
        self.blobs = blobs

    def publish(self, writer: BlobWriter, insert: Insert) -> VersionInfo:
        """Hold the written blob, move it into place, then ``insert(blob, hold_id)`` its row
        (which drops the hold). When no row was made (an error, or the lazy-init race lost),
        the hold is dropped and the blob collected unless something else refers to it."""
        try:
            hold_id = self.repository.add_hold(writer.sha256)
        except BaseException:
            writer.discard()
            raise
        created = False
        try:
            blob = self.blobs.commit(writer)
            version, created = insert(blob, hold_id)
            return version
        finally:
            if not created:
                self._collect([writer.sha256], drop_holds=[hold_id])

    def release(self, sha256: str, hold_id: int) -> None:
        """Drop a hold taken with ``repository.add_hold`` and collect the blob unless a
        version row now refers to it (an update's optimizer state: kept once its row commits,
        deleted when the update was refused)."""
        self._collect([sha256], drop_holds=[hold_id])

    def collect(self, shas: Iterable[str], stale_hold_s: float | None = None) -> list[str]:
        """Delete the blobs of ``shas`` that nothing refers to; returns those deleted.
        ``stale_hold_s``: holds older than that count as dead and are removed first."""
        stale_before = (
            utcnow() - dt.timedelta(seconds=stale_hold_s) if stale_hold_s is not None else None
        )
        return self._collect(shas, stale_before=stale_before)

    def _collect(self, shas: Iterable[str], drop_holds=(), stale_before=None) -> list[str]:
        with self.repository.collecting(shas, drop_holds, stale_before) as unused:
            deleted = []
            for sha in unused:
                try:
                    self.blobs.delete(sha)
                except Unavailable as err:  # the object store is down: an orphan for repair
                    log.warning("blob %s kept as an orphan: %s", sha, err)
                    continue
                deleted.append(sha)
            return deleted
