"""The Alembic migrations build exactly the schema the ORM declares, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from paramserve.registry import FailedPrecondition, Store
from paramserve.registry.database import alembic_config
from paramserve.registry.database import current_revision, head_revision
from paramserve.registry.schema import Base

from conftest import fresh_postgres_database


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


def revisions() -> list[str]:
    """Every revision, oldest first."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def upgrade_from(old: str, url: str, data_dir) -> None:
    """A database at revision ``old`` (holding a model) is refused by the store with the
    command that fixes it; `paramserve db upgrade` brings it to the head, data intact."""
    config = alembic_config(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, old)
        conn.execute(text("INSERT INTO models (name, architecture, config, init, seed, "
                          "description, next_version, created_at) VALUES ('kept', "
                          "'small_mlp', '{\"in_features\": 4, \"hidden\": 8, "
                          "\"out_features\": 1}', 'default', 0, '', 1, CURRENT_TIMESTAMP)"))
    engine.dispose()
    with pytest.raises(FailedPrecondition, match="paramserve db upgrade"):
        Store(url, data_dir=data_dir)
    result = subprocess.run([sys.executable, "-m", "paramserve.service.cli", "db", "upgrade",
                             "--registry-url", url], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with Store(url, data_dir=data_dir) as store:
        assert store.get_model("kept").architecture == "small_mlp"
        store.create_model("new", "small_mlp")
        assert store.generation() >= 1
        assert schema_drift(store.engine) == []


def test_sqlite_upgrades_from_every_earlier_revision(tmp_path):
    assert len(revisions()) >= 2
    for i, old in enumerate(revisions()[:-1]):
        data_dir = tmp_path / str(i)
        data_dir.mkdir()
        upgrade_from(old, f"sqlite:///{data_dir / 'registry.db'}", data_dir)


def test_postgresql_upgrades_from_every_earlier_revision(tmp_path):
    for old in revisions()[:-1]:
        with fresh_postgres_database() as url:
            upgrade_from(old, url, tmp_path)
