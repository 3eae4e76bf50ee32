"""ORM tables of the registry (SQLAlchemy 2.0 typed mappings); every constraint is named.

Rows never leave the store: ``store.py`` turns them into ``values`` dataclasses.
Changing a table here needs a migration in ``migrations/versions/``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class ModelRow(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    architecture: Mapped[str] = mapped_column(String(200))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    init: Mapped[str] = mapped_column(String(200))
    seed: Mapped[int] = mapped_column(BigInteger)
    description: Mapped[str] = mapped_column(Text, default="")
    # Version numbers are never reused, even after the newest is deleted: a cache or a client
    # holding "version 3" must never see different parameters under that number.
    next_version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    versions: Mapped[list[VersionRow]] = relationship(
        back_populates="model",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="VersionRow.number",
    )
    aliases: Mapped[list[AliasRow]] = relationship(
        back_populates="model",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="AliasRow.name",
    )


class VersionRow(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("model_id", "number", name="uq_versions_model_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    manifest: Mapped[list[Any]] = mapped_column(JSON)
    origin: Mapped[str] = mapped_column(String(20))
    parent: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # What made the version (``provenance``): {"kind": "upload", "file": ..., "file_sha256": ...},
    # {"kind": "init", "scheme": ..., "module": ...}, {"kind": "patch", ...}, {"kind": "update",
    # ...}; {} for versions written before migration 0004.
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    note: Mapped[str] = mapped_column(Text, default="")
    author: Mapped[str] = mapped_column(String(200), default="")  # the token's name, or ""
    # The blob of the optimizer state after an ``update`` step (None for other origins).
    optimizer_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)

    model: Mapped[ModelRow] = relationship(back_populates="versions")


class AliasRow(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("model_id", "name", name="uq_aliases_model_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    version_id: Mapped[int] = mapped_column(
        ForeignKey("versions.id", ondelete="CASCADE"), index=True
    )

    model: Mapped[ModelRow] = relationship(back_populates="aliases")
    version: Mapped[VersionRow] = relationship()


class BlobHoldRow(Base):
    """An upload's claim on a blob between placing the file and committing its version row.

    Garbage collection deletes a blob only when no version row and no hold names it (checked
    under the blob's lock, see ``repository``); a hold older than ``STALE_HOLD_S`` was left by
    a crashed writer and is removed by ``paramserve check --repair``.
    """

    __tablename__ = "blob_holds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RegistryState(Base):
    """One row: ``generation`` grows with every change, so replicas notice changes cheaply."""

    __tablename__ = "registry_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    generation: Mapped[int] = mapped_column(BigInteger)
