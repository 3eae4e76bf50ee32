"""Engine, transactions and schema checks: the one place that knows about SQL dialects.

SQLite gets WAL, foreign keys and a busy timeout, and every transaction starts with
``BEGIN IMMEDIATE`` so two writers queue instead of failing on a lock upgrade. A new, empty
database is migrated to the newest schema; an older or unknown schema is refused with the
command that fixes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from .errors import FailedPrecondition, Unavailable

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
SCHEMA_LOCK_ID = 0x7061_7261  # any fixed number: the advisory lock guarding schema creation
CHANGES_CHANNEL = "paramserve_changes"  # NOTIFY'd with the new generation (registry/notify.py)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        )
        _configure_sqlite(engine)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves, below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    if head is None:
        raise FailedPrecondition(f"no migrations in {MIGRATIONS_DIR}: reinstall paramserve")
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, url: str) -> None:
    """Migrate the database to the newest schema (``paramserve db upgrade``)."""
    config = alembic_config(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def ensure_schema(engine: Engine, url: str) -> None:
    """Create the schema in an empty database; refuse any schema but the newest.

    Replicas starting together on one empty database take turns (a PostgreSQL advisory lock;
    SQLite's write lock), so exactly one of them creates the schema.
    """
    try:
        with _schema_lock(engine):
            current = current_revision(engine)
            if current is None and not inspect(engine).get_table_names():
                upgrade(engine, url)
                return
    except DBAPIError as err:
        raise cannot_open(engine, err) from err
    head = head_revision()
    if current != head:
        raise FailedPrecondition(
            f"registry database {engine.url.render_as_string(hide_password=True)} has schema "
            f"revision {current!r}, this paramserve needs {head!r}; run "
            "`paramserve db upgrade --registry-url URL` (back up the database first)"
        )


def cannot_open(engine: Engine, err: DBAPIError) -> FailedPrecondition:
    """One line naming the database (password masked) or, for SQLite, its file and folder,
    instead of the driver's traceback."""
    reason = str(err.orig).strip().splitlines()[0] if err.orig is not None else str(err)
    if engine.dialect.name == "sqlite" and engine.url.database:
        path = Path(engine.url.database).resolve()
        return FailedPrecondition(
            f"cannot open the registry database {path}: {reason}; check that {path.parent} "
            "is a directory this user can write (the data dir, --data-dir) and that "
            f"{path.name} in it is a SQLite file"
        )
    return FailedPrecondition(
        f"cannot open the registry database "
        f"{engine.url.render_as_string(hide_password=True)}: {reason}"
    )


@contextmanager
def _schema_lock(engine: Engine) -> Iterator[None]:
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as connection:
        connection.exec_driver_sql(f"SELECT pg_advisory_lock({SCHEMA_LOCK_ID})")
        connection.commit()
        try:
            yield
        finally:
            connection.exec_driver_sql(f"SELECT pg_advisory_unlock({SCHEMA_LOCK_ID})")
            connection.commit()


class Transactions:
    """``with tx() as session:`` — one transaction, committed on success, rolled back on error.

    A database that cannot be reached or fails the transaction for its own reasons (a
    connection lost, a restart, a lock) is ``Unavailable`` (gRPC UNAVAILABLE: retry), not an
    internal error; nothing of the transaction is committed."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._factory = sessionmaker(engine, expire_on_commit=False)
        if engine.dialect.name == "postgresql":
            _announce_changes(self._factory)

    @contextmanager
    def __call__(self) -> Iterator[Session]:
        try:
            with self._factory.begin() as session:
                yield session
        except OperationalError as err:
            raise unavailable(self._engine, err) from err


def unavailable(engine: Engine, err: DBAPIError) -> Unavailable:
    reason = str(err.orig).strip().splitlines()[0] if err.orig is not None else str(err)
    return Unavailable(
        f"registry database {engine.url.render_as_string(hide_password=True)} is unavailable: "
        f"{reason}; retry later"
    )


def _announce_changes(factory: sessionmaker) -> None:
    """A transaction that bumps the generation (``registry_state``) also sends
    ``NOTIFY paramserve_changes, '<generation>'``, in that transaction: PostgreSQL delivers it
    to the listening replicas only when the change commits, and never when it rolls back."""

    @event.listens_for(factory, "do_orm_execute")
    def _note_bump(state):
        table = getattr(state.statement, "table", None)
        if state.is_update and getattr(table, "name", None) == "registry_state":
            state.session.info["announce"] = True

    @event.listens_for(factory, "before_commit")
    def _announce(session):
        if session.info.pop("announce", False):
            session.execute(
                text(
                    "SELECT pg_notify(:channel, generation::text) FROM registry_state WHERE id = 1"
                ),
                {"channel": CHANGES_CHANNEL},
            )

    @event.listens_for(factory, "after_rollback")
    def _forget(session):
        session.info.pop("announce", None)
