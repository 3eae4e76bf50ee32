"""The registry's SQL: rows in, frozen values (``values``) out; nothing here touches a file.

Every name and ref is validated (``names``, ``refs``) before it reaches a query, so a NUL byte
or an out-of-range number is ``InvalidArgument`` / ``NotFound``, never a driver error.
Blob locks (``lock_blobs``) order garbage collection with uploads: on PostgreSQL a transaction
advisory lock per sha256; on SQLite every transaction is ``BEGIN IMMEDIATE`` (``database``),
which already serializes writers across processes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import delete, exists, func, or_, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import architectures
from .database import Transactions
from .errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from .names import check_alias, check_name
from .refs import is_version_number, parse_ref
from .schema import AliasRow, BlobHoldRow, ModelRow, RegistryState, VersionRow
from .values import ManifestEntry, ModelInfo, TensorSpec, VersionInfo

BLOB_LOCK_CLASS = 0x626C_6F62  # "blob": the first key of the two-key advisory locks on blobs
VERSION_NUMBER_ATTEMPTS = 10


class Repository:
    """Models, versions, aliases and blob holds in one SQL database (any process, any replica)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tx = Transactions(engine)

    def generation(self) -> int:
        """A number that grows with every change to the registry (by any process)."""
        with self.engine.connect() as connection:
            generation = connection.scalar(
                select(RegistryState.generation).where(RegistryState.id == 1)
            )
        assert generation is not None  # migration 0002 inserts the one row, never deleted
        return generation

    # ---- models -------------------------------------------------------------------------

    def create_model(
        self,
        name: str,
        architecture: str,
        config: Mapping[str, Any],
        init: str,
        seed: int,
        description: str,
    ) -> ModelInfo:
        check_name(name)
        try:
            with self.tx() as session:
                row = ModelRow(
                    name=name,
                    architecture=architecture,
                    config=dict(config),
                    init=init,
                    seed=seed,
                    description=description,
                    next_version=1,
                )
                session.add(row)
                session.flush()
                _bump_generation(session)
                return _model_info(session, row)
        except IntegrityError:
            raise AlreadyExists(
                f"model {name!r} already exists; pick another name or delete it first"
            ) from None

    def get_model(self, name: str) -> ModelInfo:
        with self.tx() as session:
            return _model_info(session, _model_row(session, name))

    def list_models(self) -> list[ModelInfo]:
        with self.tx() as session:
            rows = session.scalars(select(ModelRow).order_by(ModelRow.name)).all()
            return [_model_info(session, row) for row in rows]

    def delete_model(self, name: str) -> set[str]:
        """Delete a model with its versions and aliases; returns the sha256s they used."""
        with self.tx() as session:
            row = _model_row(session, name)
            shas = {v.sha256 for v in row.versions}
            shas |= {v.optimizer_sha256 for v in row.versions if v.optimizer_sha256}
            session.delete(row)
            _bump_generation(session)
        return shas

    # ---- versions -----------------------------------------------------------------------

    def list_versions(self, name: str) -> list[VersionInfo]:
        with self.tx() as session:
            model = _model_row(session, name)
            return [_version_info(row, model) for row in model.versions]

    def resolve(self, name: str, ref: int | str | None = None) -> VersionInfo:
        """A version by number, alias, or the latest (``None``, ``""`` or ``"latest"``)."""
        parsed = parse_ref(ref)
        with self.tx() as session:
            model = _model_row(session, name)
            return _version_info(_resolve_row(session, model, parsed), model)

    def latest_or_none(self, name: str) -> VersionInfo | None:
        with self.tx() as session:
            model = _model_row(session, name)
            row = _latest_row(session, model)
            return None if row is None else _version_info(row, model)

    def insert_version(
        self,
        name: str,
        sha256: str,
        size_bytes: int,
        manifest: Sequence[ManifestEntry],
        origin: str,
        parent: int | None,
        alias: str | None,
        hold_id: int | None,
        first_only: bool = False,
        *,
        provenance: Mapping[str, Any] | None = None,
        note: str = "",
        author: str = "",
        optimizer_sha256: str | None = None,
        head: tuple[str | None, bool, int] | None = None,
    ) -> tuple[VersionInfo, bool]:
        """Insert the next version row and drop the upload's blob hold in one transaction.

        Returns ``(version, created)``; with ``first_only`` an existing version wins and is
        returned with ``created=False`` (the lazy-init race), the hold left to the caller.
        ``provenance``, ``note``, ``author``: what made it (checked by ``provenance``).
        ``head``: ``(alias, latest, parent)`` for an update (``updates``): commit only if
        ``alias`` (else, with ``latest``, the newest version) still names version ``parent``,
        else ``Aborted`` naming the version to rebase onto; the alias moves to the new row.
        """
        if alias is not None:
            check_alias(alias)
        for _attempt in range(VERSION_NUMBER_ATTEMPTS):
            try:
                with self.tx() as session:
                    lock_blobs(session, [sha256])
                    model = _model_row(session, name)
                    latest = _latest_row(session, model) if first_only else None
                    if latest is not None:
                        return _version_info(latest, model), False
                    if head is not None:
                        _check_head(session, model, *head)
                    number = model.next_version
                    model.next_version = number + 1
                    row = VersionRow(
                        model_id=model.id,
                        number=number,
                        sha256=sha256,
                        size_bytes=size_bytes,
                        manifest=[_manifest_json(e) for e in manifest],
                        origin=origin,
                        parent=parent,
                        provenance=dict(provenance or {}),
                        note=note,
                        author=author,
                        optimizer_sha256=optimizer_sha256,
                    )
                    session.add(row)
                    session.flush()
                    if alias is not None:
                        _point_alias(session, model, alias, row)
                        session.flush()
                    if hold_id is not None:
                        session.execute(delete(BlobHoldRow).where(BlobHoldRow.id == hold_id))
                    _bump_generation(session)
                    return _version_info(row, model), True
            except IntegrityError:
                continue  # another writer took the number (PostgreSQL); take the next one
        raise FailedPrecondition(
            f"could not allocate a version number for {name!r}: too many concurrent writers; retry"
        )

    def delete_version(
        self, name: str, number: int, force: bool = False
    ) -> tuple[list[str], list[str]]:
        """Delete one version; returns the sha256s of its blobs (parameters, and optimizer
        state after an update) and the aliases removed with it.

        A version an alias points at is refused (``FailedPrecondition`` naming the aliases)
        unless ``force``: then those aliases go too.
        """
        with self.tx() as session:
            model = _model_row(session, name)
            row = _version_by_number(session, model, number)
            aliases = sorted(a.name for a in model.aliases if a.version_id == row.id)
            if aliases and not force:
                raise FailedPrecondition(
                    f"version {row.number} of {name!r} is what aliases {aliases[:20]} point at; "
                    "move them first (`paramserve alias`) or delete with --force, which "
                    "removes them"
                )
            session.execute(delete(AliasRow).where(AliasRow.version_id == row.id))
            shas = [row.sha256] + ([row.optimizer_sha256] if row.optimizer_sha256 else [])
            session.delete(row)
            _bump_generation(session)
            return shas, aliases

    # ---- aliases ------------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, number: int) -> VersionInfo:
        check_alias(alias)
        with self.tx() as session:
            model = _model_row(session, name)
            version = _version_by_number(session, model, number)
            _point_alias(session, model, alias, version)
            session.flush()
            _bump_generation(session)
            return _version_info(version, model)

    def delete_alias(self, name: str, alias: str) -> None:
        check_alias(alias)
        with self.tx() as session:
            model = _model_row(session, name)
            row = session.scalar(
                select(AliasRow).where(AliasRow.model_id == model.id, AliasRow.name == alias)
            )
            if row is None:
                raise NotFound(
                    f"model {name!r} has no alias {alias!r}; "
                    f"its aliases: {[a.name for a in model.aliases][:20]}"
                )
            session.delete(row)
            _bump_generation(session)

    # ---- blob holds and collection ------------------------------------------------------

    def add_hold(self, sha256: str) -> int:
        """Claim a blob before relying on its file; returns the hold's id."""
        with self.tx() as session:
            lock_blobs(session, [sha256])
            hold = BlobHoldRow(sha256=sha256)
            session.add(hold)
            session.flush()
            return hold.id

    @contextmanager
    def collecting(
        self,
        shas: Iterable[str],
        drop_holds: Sequence[int] = (),
        stale_before: dt.datetime | None = None,
    ) -> Iterator[list[str]]:
        """One write transaction, the blobs' locks held, yielding the sha256s of ``shas`` that
        no version row and no hold names: the caller deletes their files inside the ``with``.

        ``drop_holds``: hold ids released first (an upload that did not make its version);
        ``stale_before``: holds older than that are dead (a crashed writer's) and removed.
        """
        wanted = sorted(set(shas))
        with self.tx() as session:
            lock_blobs(session, wanted)
            if drop_holds:
                session.execute(delete(BlobHoldRow).where(BlobHoldRow.id.in_(list(drop_holds))))
            if stale_before is not None and wanted:
                session.execute(
                    delete(BlobHoldRow).where(
                        BlobHoldRow.sha256.in_(wanted), BlobHoldRow.created_at < stale_before
                    )
                )
            yield [sha for sha in wanted if not _blob_in_use(session, sha)]

    def blob_references(self) -> tuple[list[tuple[str, int, str]], dict[str, int], list[str]]:
        """For ``check``: (model, number, sha256) of every version, sha256 → live holds, and
        ``model@alias`` of aliases whose version is gone."""
        with self.tx() as session:
            rows = [
                (model, number, sha256)
                for model, number, sha256 in session.execute(
                    select(ModelRow.name, VersionRow.number, VersionRow.sha256)
                    .join(VersionRow, VersionRow.model_id == ModelRow.id)
                    .order_by(ModelRow.name, VersionRow.number)
                )
            ]
            rows += [  # an update's optimizer state: a blob its version refers to
                (model, number, sha256)  # type: ignore[misc]
                for model, number, sha256 in session.execute(
                    select(ModelRow.name, VersionRow.number, VersionRow.optimizer_sha256)
                    .join(VersionRow, VersionRow.model_id == ModelRow.id)
                    .where(VersionRow.optimizer_sha256.is_not(None))
                    .order_by(ModelRow.name, VersionRow.number)
                )
            ]
            holds = dict(
                session.execute(
                    select(BlobHoldRow.sha256, func.count()).group_by(BlobHoldRow.sha256)
                ).all()
            )
            version_ids = set(session.scalars(select(VersionRow.id)))
            dangling = [
                f"{m}@{a}"
                for m, a, vid in session.execute(
                    select(ModelRow.name, AliasRow.name, AliasRow.version_id).join(
                        AliasRow, AliasRow.model_id == ModelRow.id
                    )
                )
                if vid not in version_ids
            ]
        return rows, holds, dangling


def lock_blobs(session: Session, shas: Iterable[str]) -> None:
    """Take the blobs' locks for the rest of the transaction (PostgreSQL; SQLite's write
    transaction is one lock already). Sorted, so two collectors cannot deadlock."""
    if session.get_bind().dialect.name != "postgresql":
        return
    for sha in sorted(set(shas)):
        session.execute(
            text("SELECT pg_advisory_xact_lock(:cls, :key)"),
            {"cls": BLOB_LOCK_CLASS, "key": _lock_key(sha)},
        )


def _lock_key(sha256: str) -> int:
    """A signed 32-bit key from the digest's first 8 hex digits."""
    return int(sha256[:8], 16) - (1 << 31)


def _check_head(session: Session, model: ModelRow, alias: str | None, latest: bool, parent: int):
    """An update's commit condition (``insert_version``'s ``head``), inside its transaction."""
    if alias is None and not latest:
        return
    if alias is not None:
        row = session.scalar(
            select(AliasRow).where(AliasRow.model_id == model.id, AliasRow.name == alias)
        )
        now = row.version.number if row is not None else None
        where = f"alias {alias!r}"
    else:
        newest = _latest_row(session, model)
        now = newest.number if newest is not None else None
        where = "the latest version"
    if now != parent:
        target = f"rebase onto v{now}" if now is not None else "it no longer exists"
        raise Aborted(
            f"update of {model.name!r} was computed from v{parent}, but {where} is now "
            f"{'v' + str(now) if now is not None else 'gone'}: {target} (recompute from it "
            "and retry); nothing was applied"
        )


def _blob_in_use(session: Session, sha256: str) -> bool:
    """One statement (one snapshot): a version row (its parameters or its optimizer state)
    or a hold names the blob."""
    return bool(
        session.scalar(
            select(
                or_(
                    exists().where(VersionRow.sha256 == sha256),
                    exists().where(VersionRow.optimizer_sha256 == sha256),
                    exists().where(BlobHoldRow.sha256 == sha256),
                )
            )
        )
    )


def _model_row(session: Session, name: str) -> ModelRow:
    check_name(name)
    row = session.scalar(select(ModelRow).where(ModelRow.name == name))
    if row is None:
        raise NotFound(
            f"model {name!r} not found; create it with `paramserve create {name} "
            "--architecture ARCH` (list models with `paramserve models`)"
        )
    return row


def _version_by_number(session: Session, model: ModelRow, number: int | str) -> VersionRow:
    ref = parse_ref(number)
    if not isinstance(ref, int):
        raise InvalidArgument(f"a version number is needed here, not {str(number)[:80]!r}")
    return _resolve_row(session, model, ref)


def _resolve_row(session: Session, model: ModelRow, ref: int | str | None) -> VersionRow:
    """One indexed lookup of a parsed ref; the listing in the error is read only on failure."""
    query = select(VersionRow).where(VersionRow.model_id == model.id)
    if ref is None:
        row = _latest_row(session, model)
        if row is None:
            raise NotFound(
                f"model {model.name!r} has no versions yet; upload parameters "
                f"with `paramserve upload {model.name} FILE`"
            )
        return row
    if isinstance(ref, int):
        row = (
            session.scalar(query.where(VersionRow.number == ref))
            if is_version_number(ref)
            else None
        )
        if row is None:
            shown = ref if abs(ref) < 10**20 else f"{str(ref)[:20]}..."
            raise NotFound(
                f"model {model.name!r} has no version {shown}; versions: "
                f"{_some(session, VersionRow.number, model)}"
            )
        return row
    row = session.scalar(
        query.join(AliasRow, AliasRow.version_id == VersionRow.id).where(
            AliasRow.model_id == model.id, AliasRow.name == ref
        )
    )
    if row is None:
        raise NotFound(
            f"model {model.name!r} has no alias {ref!r}; aliases: "
            f"{_some(session, AliasRow.name, model)}"
        )
    return row


def _latest_row(session: Session, model: ModelRow) -> VersionRow | None:
    return session.scalar(
        select(VersionRow)
        .where(VersionRow.model_id == model.id)
        .order_by(VersionRow.number.desc())
        .limit(1)
    )


def _point_alias(session: Session, model: ModelRow, alias: str, version: VersionRow) -> None:
    row = session.scalar(
        select(AliasRow).where(AliasRow.model_id == model.id, AliasRow.name == alias)
    )
    if row is None:
        session.add(AliasRow(model_id=model.id, name=alias, version_id=version.id))
    else:
        row.version_id = version.id


def _bump_generation(session: Session) -> None:
    session.execute(
        update(RegistryState)
        .where(RegistryState.id == 1)
        .values(generation=RegistryState.generation + 1)
    )


def _some(session: Session, column, model: ModelRow, limit: int = 20) -> list:
    """Up to ``limit`` values of ``column`` for ``model``, for error messages."""
    table = column.class_
    return list(
        session.scalars(
            select(column).where(table.model_id == model.id).order_by(column).limit(limit)
        )
    )


def _model_info(session: Session, row: ModelRow) -> ModelInfo:
    """A model row as a value. An architecture not registered in this process (another
    replica's code) still lists: ``lazy`` is then False, the architecture name as stored."""
    try:
        arch = architectures.get(row.architecture) if row.architecture else None
    except NotFound:
        arch = None
    return ModelInfo(
        name=row.name,
        architecture=row.architecture,
        config=dict(row.config),
        init=row.init,
        seed=row.seed,
        description=row.description,
        created_at=_utc(row.created_at),
        lazy=bool(arch and arch.is_lazy(row.config)),
        aliases={a.name: a.version.number for a in row.aliases},
        latest_version=session.scalar(
            select(func.max(VersionRow.number)).where(VersionRow.model_id == row.id)
        ),
    )


def _version_info(row: VersionRow, model: ModelRow) -> VersionInfo:
    return VersionInfo(
        model=model.name,
        number=row.number,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        origin=row.origin,
        parent=row.parent,
        created_at=_utc(row.created_at),
        manifest=tuple(
            ManifestEntry(
                e["name"],
                TensorSpec(tuple(e["shape"]), e["dtype"]),
                e.get("tied_to"),
                e.get("sha256"),
            )
            for e in row.manifest
        ),
        aliases=tuple(sorted(a.name for a in model.aliases if a.version_id == row.id)),
        provenance=dict(row.provenance or {}),
        note=row.note or "",
        author=row.author or "",
        optimizer_sha256=row.optimizer_sha256,
    )


def _manifest_json(entry: ManifestEntry) -> dict[str, Any]:
    out = {
        "name": entry.name,
        "shape": list(entry.spec.shape or ()),
        "dtype": entry.spec.dtype,
        "tied_to": entry.tied_to,
    }
    if entry.sha256 is not None:
        out["sha256"] = entry.sha256
    return out


def _utc(when: dt.datetime) -> dt.datetime:
    """SQLite hands timestamps back without their zone; they were written in UTC."""
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)
