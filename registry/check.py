"""``paramserve check``: verify a data dir's invariants, and optionally clean up after crashes.

Invariants: every version row has its blob (and an update's, its optimizer-state blob) and the
blob's sha256 matches; no alias points at a
missing version; no temporary file is ever served (they live apart, in ``blobs/tmp`` and
``spool``; in an object store, as unfinished multipart uploads and under ``PREFIX/tmp/``).
Blobs are listed and read through the store's ``blobstore.Blobs``, so both kinds are checked.

``open_existing`` opens the registry to check and creates nothing: a mistyped data dir is an
error naming the path, never a fresh empty registry reported as OK.

``repair`` removes orphaned blobs and temporary files. A blob is an orphan by the database's
state, never by its file's age: no version row refers to it and no upload holds it (a hold
older than ``STALE_HOLD_S`` is a crashed writer's and is removed first). Each removal is
re-decided under the blob's lock by ``gc.BlobCollector``, so an upload that re-uses the blob
meanwhile keeps it. Temporary files (and unfinished multipart
uploads, aged by their last part) older than ``min_age_s`` are removed (younger ones may belong
to a write in flight). Repair never removes a blob a version refers to, and cannot
restore a missing or corrupt one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .blobs import TEMP_SUFFIX
from .blobstore import Temporary
from .database import make_engine
from .errors import DataLoss, NotFound
from .gc import STALE_HOLD_S
from .store import Store, default_url


@dataclass
class CheckReport:
    versions_checked: int = 0
    missing_blobs: list[str] = field(default_factory=list)  # "model@number sha256"
    corrupt_blobs: list[str] = field(default_factory=list)
    dangling_aliases: list[str] = field(default_factory=list)
    orphan_blobs: list[str] = field(default_factory=list)  # no version row, no hold
    held_blobs: list[str] = field(default_factory=list)  # an upload in flight (or dead)
    temp_files: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is lost: orphans and temp files are waste, not damage."""
        return not (self.missing_blobs or self.corrupt_blobs or self.dangling_aliases)


def open_existing(
    url: str | None,
    data_dir: str | Path,
    blob_url: str | None = None,
    s3_endpoint_url: str | None = None,
) -> Store:
    """The store of a registry that exists; ``NotFound`` naming the path when ``data_dir``
    (or the database ``url`` names) holds none. Nothing is created on the way."""
    data = Path(data_dir)
    hint = "give the --data-dir (and --registry-url) the server uses"
    if not data.is_dir():
        raise NotFound(f"data dir {data.resolve()} does not exist; {hint}")
    url = url or default_url(data)
    engine = make_engine(url)
    try:
        if engine.dialect.name == "sqlite":
            database = Path(engine.url.database or "")
            if not engine.url.database or not database.is_file():
                raise NotFound(
                    f"{data.resolve()} holds no registry: there is no {database}; {hint}"
                )
        from sqlalchemy import inspect
        from sqlalchemy.exc import DBAPIError

        from .database import cannot_open

        try:
            tables = inspect(engine).get_table_names()
        except DBAPIError as err:
            raise cannot_open(engine, err) from err
        if not tables:
            raise NotFound(
                f"registry database "
                f"{engine.url.render_as_string(hide_password=True)} is empty: it "
                f"holds no registry; {hint}"
            )
    finally:
        engine.dispose()
    return Store(url, data_dir=data, blob_url=blob_url, s3_endpoint_url=s3_endpoint_url)


def check(
    store: Store,
    repair: bool = False,
    min_age_s: float = 600.0,
    verify_hashes: bool = True,
    stale_hold_s: float = STALE_HOLD_S,
) -> CheckReport:
    report = CheckReport()
    rows, holds, report.dangling_aliases = store.repository.blob_references()
    referenced = set()
    # a version's blobs: its parameters, and after an update its optimizer state
    report.versions_checked = len({(model, number) for model, number, _ in rows})
    for model, number, sha in rows:
        referenced.add(sha)
        label = f"{model}@{number} {sha}"
        if not store.blobs.exists(sha):
            report.missing_blobs.append(label)
        elif verify_hashes:
            try:
                store.blobs.verify(sha)
            except DataLoss:
                report.corrupt_blobs.append(label)
    unreferenced = {}
    for sha, label in store.blobs.list_blobs():
        if sha in referenced:
            continue
        if sha in holds:
            report.held_blobs.append(label)
        else:
            report.orphan_blobs.append(label)
        unreferenced[sha] = label
    if repair:  # the holds' shas too: a writer that died before placing its file left one
        candidates = set(unreferenced) | (set(holds) - referenced)
        removed = store.collector.collect(candidates, stale_hold_s=stale_hold_s)
        report.removed.extend(unreferenced[sha] for sha in removed if sha in unreferenced)
    for temporary in store.blobs.temporaries() + _spool_files(store.data_dir / "spool"):
        report.temp_files.append(temporary.label)
        if repair and temporary.age_s >= min_age_s:
            if temporary.handle is None:  # a spool file
                Path(temporary.label).unlink(missing_ok=True)
            else:
                store.blobs.remove_temporary(temporary)
            report.removed.append(temporary.label)
    return report


def _spool_files(folder: Path) -> list[Temporary]:
    """Upload spools (always local, whatever the blob store), with their ages."""
    out, now = [], time.time()
    for path in sorted(folder.glob(f"*{TEMP_SUFFIX}")) if folder.is_dir() else []:
        try:
            age_s = now - path.stat().st_mtime
        except FileNotFoundError:  # an upload finished (or its writer cleaned up) since
            continue
        out.append(Temporary(str(path), age_s))
    return out
