"""Registry changes pushed by PostgreSQL: LISTEN on a dedicated connection.

Every transaction that bumps the registry's generation also sends ``NOTIFY
paramserve_changes, '<generation>'`` (``database``), delivered when it commits. A replica's
``ChangeListener`` calls ``on_change()`` for each one, so it looks at the registry at once
instead of at its next poll. The poll stays the fallback: SQLite has no LISTEN, and while the
connection is lost (the database restarted, a proxy cut it) the listener reconnects with a
growing delay and the poll alone carries changes. ``on_change()`` is also called after every
(re)connect, for whatever changed while nobody listened.

Plain asyncio and psycopg 3; it knows nothing of what ``on_change`` refreshes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import psycopg
from psycopg.conninfo import make_conninfo
from sqlalchemy.engine import Engine

from .database import CHANGES_CHANNEL

log = logging.getLogger("paramserve")

RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 10.0
# A connection can die silently (a host gone, a NAT entry dropped): with no notification for
# PING_S the listener sends a query, which must answer within PING_TIMEOUT_S; TCP keepalives
# back this up while it waits for notifications.
PING_S = 30.0
PING_TIMEOUT_S = 10.0
CONNECT_OPTIONS: dict[str, str | int] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "application_name": "paramserve-listen",
}


class ChangeListener:
    """``LISTEN paramserve_changes`` on its own connection, for as long as it runs."""

    def __init__(
        self,
        conninfo: str,
        on_change: Callable[[], None],
        label: str = "PostgreSQL",
        ping_s: float = PING_S,
    ):
        self._conninfo = make_conninfo(conninfo, **CONNECT_OPTIONS)
        self._on_change = on_change
        self._label = label
        self._ping_s = ping_s
        self._task: asyncio.Task | None = None
        self.listening = False  # connected and LISTENing now
        self.connects = 0  # how many times it (re)connected, for tests and logs

    @classmethod
    def for_engine(cls, engine: Engine, on_change: Callable[[], None]) -> ChangeListener | None:
        """A listener on the engine's database, or ``None`` when it is not PostgreSQL."""
        if engine.dialect.name != "postgresql":
            return None
        url = engine.url.set(drivername="postgresql")  # libpq's URI: no "+psycopg"
        return cls(
            url.render_as_string(hide_password=False),
            on_change,
            engine.url.render_as_string(hide_password=True),
        )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="paramserve-listen")

    async def close(self) -> None:
        """Stop listening and close the connection."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        self.listening = False

    async def _run(self) -> None:
        delay = RECONNECT_MIN_S
        logged = False
        while True:
            try:
                await self._listen()
            except (psycopg.Error, OSError, TimeoutError) as err:
                if self.listening:  # it was up: a new loss, retried from the shortest delay
                    delay, logged = RECONNECT_MIN_S, False
                if not logged:  # one line per loss, not one per attempt
                    log.warning(
                        "registry change notifications from %s stopped (%s); polling "
                        "meanwhile (--sync-interval-s) and reconnecting",
                        self._label,
                        _one_line(err),
                    )
                    logged = True
            self.listening = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _listen(self) -> None:
        conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        async with conn:
            await conn.execute(f"LISTEN {CHANGES_CHANNEL}")
            self.connects += 1
            if self.connects > 1:
                log.info("registry change notifications from %s resumed", self._label)
            self.listening = True
            self._on_change()  # whatever changed while nobody listened
            while True:
                async for _ in conn.notifies(timeout=self._ping_s):
                    self._on_change()
                await asyncio.wait_for(conn.execute("SELECT 1"), PING_TIMEOUT_S)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
