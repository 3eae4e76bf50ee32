"""Registry changes pushed by PostgreSQL LISTEN/NOTIFY (registry/notify.py).

The replicas poll every 30 s here, so a change served within PUSHED_WITHIN_S can only have
come by notification. The polling fallback (SQLite, a lost connection) has its own tests.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import psycopg
import pytest
import torch
from sqlalchemy.engine import make_url

from paramserve.registry import Store
from paramserve.registry.errors import AlreadyExists
from paramserve.service.client import Client

from conftest import ServerProcess, fresh_postgres_database, reference_module, wait_for

LONG_POLL_S = 30.0
PUSHED_WITHIN_S = 2.0  # what the tests allow; measured on the loaded 2-core box: see README
POLLED_WITHIN_S = 10.0  # for SYNC_POLL_S below, with room for a loaded box
SYNC_POLL_S = 0.5
MOVES = 20


def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def admin_sql(url: str, sql: str) -> list[tuple]:
    """Run ``sql`` on the server's ``postgres`` database (not the one under test)."""
    admin = make_url(libpq(url)).set(database="postgres")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        cursor = conn.execute(sql)
        return cursor.fetchall() if cursor.description else []


def listen_pids(url: str) -> set[int]:
    database = make_url(url).database
    rows = admin_sql(
        url,
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'paramserve-listen' "
        f"AND datname = '{database}'",
    )
    return {pid for (pid,) in rows}


@pytest.fixture
def pair(tmp_path: Path):
    """Replicas A and B on one fresh PostgreSQL database and one blob directory."""
    with fresh_postgres_database() as url:
        data = tmp_path / "data"
        servers = {
            name: ServerProcess(
                data, "--registry-url", url, "--sync-interval-s", str(LONG_POLL_S),
                log_name=name)
            for name in "AB"
        }
        clients = {name: Client(srv.address) for name, srv in servers.items()}
        try:
            assert wait_for(lambda: len(listen_pids(url)) == 2, 20)
            yield url, servers, clients
        finally:
            for client in clients.values():
                client.close()
            for srv in servers.values():
                srv.stop()


def two_versions(client: Client, name: str):
    """A model with versions 1 and 2; ``production`` → 1."""
    first, second = (reference_module("small_mlp", False, seed=s) for s in (1, 2))
    client.create_model(name, "small_mlp")
    client.upload(name, first.state_dict(), alias="production")
    client.upload(name, second.state_dict())
    return {1: first, 2: second}


def seconds_until_served(client: Client, name: str, module, x, within_s: float) -> float:
    """How long until ``client`` answers ``production`` with ``module``'s output."""
    start = time.monotonic()
    with torch.no_grad():
        expected = module(x)
    while True:
        elapsed = time.monotonic() - start
        if torch.allclose(torch.as_tensor(client.infer(name, x, "production")), expected,
                          atol=1e-6):
            return elapsed
        assert elapsed <= within_s, f"not served after {elapsed:.2f} s"
        time.sleep(0.005)


def test_a_committed_change_notifies_its_generation_and_a_rolled_back_one_nothing(tmp_path):
    with fresh_postgres_database() as url, Store(url, data_dir=tmp_path / "data") as store:
        with psycopg.connect(libpq(url), autocommit=True) as conn:
            conn.execute("LISTEN paramserve_changes")
            store.create_model("one", "mlp")
            with pytest.raises(AlreadyExists):
                store.create_model("one", "mlp")  # rolled back: no notification
            store.create_model("two", "mlp")
            payloads = [n.payload for n in conn.notifies(timeout=1.0)]
        assert payloads == ["1", "2"] == [str(g) for g in (1, store.generation())]


def test_an_alias_moved_on_a_is_served_by_b_within_the_bound(pair, capsys):
    _, _, clients = pair
    modules = two_versions(clients["A"], "pushed")
    x = torch.rand(2, 4)
    assert seconds_until_served(clients["B"], "pushed", modules[1], x, PUSHED_WITHIN_S) < 1
    delays = []
    for move in range(MOVES):
        target = 2 if move % 2 == 0 else 1
        clients["A"].set_alias("pushed", "production", target)
        delays.append(
            seconds_until_served(clients["B"], "pushed", modules[target], x, PUSHED_WITHIN_S))
    with capsys.disabled():
        print(f"\nalias move A -> served by B over {MOVES} moves: median "
              f"{statistics.median(delays) * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms")
    assert max(delays) <= PUSHED_WITHIN_S


def test_a_killed_listen_connection_reconnects_and_still_pushes(pair):
    url, servers, clients = pair
    modules = two_versions(clients["A"], "reconnect")
    x = torch.rand(2, 4)
    seconds_until_served(clients["B"], "reconnect", modules[1], x, PUSHED_WITHIN_S)
    killed = listen_pids(url)
    admin_sql(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid IN "
                   f"({', '.join(map(str, killed))})")
    assert wait_for(lambda: len(listen_pids(url) - killed) == 2, 20), "no reconnect"
    clients["A"].set_alias("reconnect", "production", 2)
    seconds_until_served(clients["B"], "reconnect", modules[2], x, PUSHED_WITHIN_S)
    log_of_b = servers["B"].log_path.read_text
    assert wait_for(lambda: log_of_b().count("notifications from") == 2, 20), log_of_b()
    assert "stopped (" in log_of_b() and "resumed" in log_of_b()  # one line each


def test_while_it_cannot_reconnect_the_poll_carries_changes_and_it_logs_once(tmp_path):
    with fresh_postgres_database() as url:
        database = make_url(url).database
        data = tmp_path / "data"
        servers = [ServerProcess(data, "--registry-url", url, "--sync-interval-s",
                                 str(SYNC_POLL_S), log_name=n) for n in "AB"]
        a, b = (Client(s.address) for s in servers)
        try:
            modules = two_versions(a, "polled")
            x = torch.rand(2, 4)
            seconds_until_served(b, "polled", modules[1], x, POLLED_WITHIN_S)
            # No new connection to the database from now on (pooled ones stay): the listeners
            # are cut and cannot come back; the replicas' pooled connections still work.
            admin_sql(url, f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS false')
            killed = listen_pids(url)
            admin_sql(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid "
                           f"IN ({', '.join(map(str, killed))})")
            time.sleep(3)  # several reconnect attempts fail meanwhile
            a.set_alias("polled", "production", 2)
            assert seconds_until_served(b, "polled", modules[2], x, POLLED_WITHIN_S) > 0
            log = servers[1].log_path.read_text()
            assert log.count("notifications from") == 1, log  # one line for the loss
            admin_sql(url, f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true')
            assert wait_for(lambda: "resumed" in servers[1].log_path.read_text(), 20)
        finally:
            admin_sql(url, f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true')
            a.close()
            b.close()
            for srv in servers:
                srv.stop()


def test_sqlite_replicas_keep_polling(tmp_path):
    data = tmp_path / "data"
    servers = [ServerProcess(data, "--sync-interval-s", str(SYNC_POLL_S), log_name=n)
               for n in "AB"]
    a, b = (Client(s.address) for s in servers)
    try:
        modules = two_versions(a, "sqlite")
        x = torch.rand(2, 4)
        seconds_until_served(b, "sqlite", modules[1], x, POLLED_WITHIN_S)
        a.set_alias("sqlite", "production", 2)
        seconds_until_served(b, "sqlite", modules[2], x, POLLED_WITHIN_S)
        assert "notifications" not in servers[1].log_path.read_text()
    finally:
        a.close()
        b.close()
        for srv in servers:
            srv.stop()


def test_while_postgresql_is_unreachable_loaded_models_serve_and_the_rest_is_unavailable(
        tmp_path):
    import grpc

    from paramserve.service.client import ServerError

    with fresh_postgres_database() as url:
        database = make_url(url).database
        server = ServerProcess(tmp_path / "data", "--registry-url", url, "--sync-interval-s", "1")
        client = Client(server.address, timeout_s=30)
        try:
            modules = two_versions(client, "down")
            x = torch.rand(2, 4)
            seconds_until_served(client, "down", modules[1], x, POLLED_WITHIN_S)
            admin_sql(url, f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS false')
            admin_sql(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                           f"datname = '{database}'")
            # what is loaded and resolved needs no SQL: it keeps serving
            seconds_until_served(client, "down", modules[1], x, 0)
            for call in (lambda: client.infer("down", x, 2), client.list_models,
                         lambda: client.set_alias("down", "production", 2)):
                with pytest.raises(ServerError) as caught:
                    call()
                assert caught.value.code == grpc.StatusCode.UNAVAILABLE
                assert "registry database" in str(caught.value), caught.value
            time.sleep(3)  # the 1 s poll fails a few times meanwhile
            admin_sql(url, f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true')
            client.set_alias("down", "production", 2)  # back: served again, nothing lost
            seconds_until_served(client, "down", modules[2], x, POLLED_WITHIN_S)
            assert [v.number for v in client.list_versions("down")] == [1, 2]
            log = server.log_path.read_text
            assert wait_for(lambda: "can be read again" in log(), 20), log()
            assert log().count("cannot read the registry generation") == 1  # once per outage
        finally:
            admin_sql(url, f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true')
            client.close()
            assert server.stop() == 0
        assert wait_for(lambda: not listen_pids(url), 10), "the LISTEN connection outlived stop"
