"""The Alembic migrations build exactly the schema the ORM declares, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from paramserve.registry import Store
from paramserve.registry.database import current_revision, head_revision
from paramserve.registry.schema import Base


def schema_drift(engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def test_sqlite_schema_matches_the_orm(store):
    assert current_revision(store.engine) == head_revision()
    assert schema_drift(store.engine) == []


def test_postgresql_schema_matches_the_orm(postgres_url, tmp_path):
    with Store(postgres_url, data_dir=tmp_path) as store:
        assert current_revision(store.engine) == head_revision()
        assert schema_drift(store.engine) == []
