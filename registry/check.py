"""``paramserve check``: verify a data dir's invariants, and optionally clean up after crashes.

Invariants: every version row has its blob and the blob's sha256 matches; no alias points at a
missing version; no temporary file is ever served (they live apart, in ``blobs/tmp`` and
``spool``). ``repair`` removes orphaned blobs (no row refers to them) and temporary files older
than ``min_age_s`` (younger ones may belong to a write in flight); it never removes a blob a
version refers to, and cannot restore a missing or corrupt one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from .blobs import TEMP_SUFFIX
from .errors import DataLoss
from .schema import AliasRow, ModelRow, VersionRow
from .store import Store


@dataclass
class CheckReport:
    versions_checked: int = 0
    missing_blobs: list[str] = field(default_factory=list)   # "model@number sha256"
    corrupt_blobs: list[str] = field(default_factory=list)
    dangling_aliases: list[str] = field(default_factory=list)
    orphan_blobs: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is lost: orphans and temp files are waste, not damage."""
        return not (self.missing_blobs or self.corrupt_blobs or self.dangling_aliases)


def check(store: Store, repair: bool = False, min_age_s: float = 600.0,
          verify_hashes: bool = True) -> CheckReport:
    report = CheckReport()
    with store.tx() as session:
        rows = session.execute(select(ModelRow.name, VersionRow.number, VersionRow.sha256)
                               .join(VersionRow, VersionRow.model_id == ModelRow.id)).all()
        aliases = session.execute(
            select(ModelRow.name, AliasRow.name, AliasRow.version_id)
            .join(AliasRow, AliasRow.model_id == ModelRow.id)).all()
        version_ids = set(session.scalars(select(VersionRow.id)))
    referenced = set()
    for model, number, sha in rows:
        report.versions_checked += 1
        referenced.add(sha)
        label = f"{model}@{number} {sha}"
        if not store.blobs.exists(sha):
            report.missing_blobs.append(label)
        elif verify_hashes:
            try:
                store.blobs.verify(sha)
            except DataLoss:
                report.corrupt_blobs.append(label)
    report.dangling_aliases = [f"{m}@{a}" for m, a, vid in aliases if vid not in version_ids]
    now = time.time()
    for path in sorted((store.blobs.root / "sha256").rglob("*.safetensors")):
        if path.name.split(".")[0] not in referenced:
            report.orphan_blobs.append(str(path))
            if repair and now - path.stat().st_mtime >= min_age_s:
                path.unlink(missing_ok=True)
                report.removed.append(str(path))
    for folder in (store.blobs.tmp_dir, store.data_dir / "spool"):
        for path in sorted(Path(folder).glob(f"*{TEMP_SUFFIX}")) if folder.is_dir() else []:
            report.temp_files.append(str(path))
            if repair and now - path.stat().st_mtime >= min_age_s:
                path.unlink(missing_ok=True)
                report.removed.append(str(path))
    return report
