"""Shared fixtures: a real store on a fresh SQLite file (or a fresh PostgreSQL database)."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import pytest
import torch

from paramserve.registry import Store, get_architecture

ALL_BUILTINS = ["centered_layer", "centered_mlp", "chimera", "fixed_hidden_mlp", "mlp",
                "my_linear_net", "my_sequential", "nest_mlp", "rgnet", "sequential_mlp",
                "small_mlp", "tied_mlp"]
LAZY_BUILTINS = [name for name in ALL_BUILTINS if name != "centered_layer"]
POSTGRES_ADMIN_URL = os.environ.get("PARAMSERVE_TEST_POSTGRES",
                                    "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


STORE_BACKENDS = ("sqlite", "postgresql")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "store_backends(*names): run the test's ``store`` on each of these backends "
        "(on a module: every test there); without it ``store`` is SQLite")


def pytest_generate_tests(metafunc):
    """One ``store`` fixture for every backend: the store's own suite marks its modules
    ``store_backends("sqlite", "postgresql")`` and so runs each store test on both; a test
    that holds only on one backend marks itself (the closest marker wins)."""
    marker = metafunc.definition.get_closest_marker("store_backends")
    if marker and "store" in metafunc.fixturenames:
        metafunc.parametrize("store", marker.args, indirect=True)


@pytest.fixture
def store(request, tmp_path: Path):
    """A fresh store: SQLite in tmp_path, or a fresh PostgreSQL database (dropped after)."""
    backend = getattr(request, "param", "sqlite")
    assert backend in STORE_BACKENDS, backend
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_postgres_database()) if backend == "postgresql" else None
        yield stack.enter_context(Store(url, data_dir=tmp_path / "data"))


@contextlib.contextmanager
def fresh_postgres_database():
    """A new, empty PostgreSQL database, dropped afterwards.

    Skips only outside CI when no server answers; in CI (CI=true) a missing server fails.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"paramserve_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no PostgreSQL at {POSTGRES_ADMIN_URL}: {err}")
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def postgres_url():
    with fresh_postgres_database() as url:
        yield url


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def blob_files(store: Store) -> list[Path]:
    """Every file in the blob directory, temporary ones included."""
    return files_under(store.blobs.root)


def config_for(architecture: str, lazy: bool) -> dict:
    return {"in_features": None} if lazy else {}


def example_input(architecture: str, lazy: bool, seed: int = 0) -> torch.Tensor:
    arch = get_architecture(architecture)
    shape = arch.example_input(arch.resolve_config(config_for(architecture, lazy))).shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def reference_module(architecture: str, lazy: bool, seed: int = 1) -> torch.nn.Module:
    """The module a user builds in-process; lazy ones materialized by a first input."""
    arch = get_architecture(architecture)
    module = arch.build(config_for(architecture, lazy), seed=seed)
    if lazy:
        with torch.no_grad():
            module(example_input(architecture, lazy))
    return module.eval()


# ---- a real server on a free loopback port ---------------------------------------------------

import select
import signal
import subprocess
import sys

SERVER_START_TIMEOUT_S = 60


# The server asks for SIGTERM when the test process dies (PR_SET_PDEATHSIG), so none outlives
# it, then runs the CLI. Asked by the server itself, not in a ``preexec_fn``: Python code between
# fork and exec in a process with live gRPC channels can crash the child before it execs (its
# stderr then holds only "Epoll1Poller encountered epoll_wait error: Bad file descriptor";
# grpc/grpc#43055, grpcio >= 1.80), and without a preexec_fn subprocess uses vfork, which runs
# no fork handlers.
_SERVE_DYING_WITH_PARENT = (
    "import ctypes, runpy, signal; "
    "ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM); "
    "runpy.run_module('paramserve.service.cli', run_name='__main__', alter_sys=True)")


class ServerProcess:
    """``paramserve serve`` in a subprocess on 127.0.0.1 with free ports, as a user runs it."""

    def __init__(self, data_dir: Path, *extra_args: str, env: dict | None = None,
                 log_name: str = "server"):
        self.data_dir = Path(data_dir)
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-{log_name}.log"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVE_DYING_WITH_PARENT, "serve", "--data-dir",
             str(self.data_dir), "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
             "--http-listen", "127.0.0.1:0", *extra_args],
            stdout=subprocess.PIPE, stderr=self.log, text=True,
            env={**os.environ, **(env or {})})
        ready, _, _ = select.select([self.proc.stdout], [], [], SERVER_START_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"server did not start: {line!r}\n{self.log_path.read_text()}")
        self.port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        self.metrics_port = int(line.split("(metrics ")[1].split(",")[0].rsplit(":", 1)[1])
        http = line.split(", http ")[1].split(",")[0] if ", http " in line else "off"
        self.http_port = None if http == "off" else int(http.rsplit(":", 1)[1])  # KServe REST
        self.address = f"127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server per test module; tests use their own model names."""
    srv = ServerProcess(tmp_path_factory.mktemp("server") / "data", "--max-upload-mb", "64",
                        "--max-tensor-elements", "4000000")
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    from paramserve.service.client import Client

    with Client(server.address, timeout_s=60) as c:
        yield c


@pytest.fixture
def model_name(request) -> str:
    """A model name unique to the test (servers are shared within a module)."""
    return "m-" + uuid.uuid4().hex[:10]


# ---- waiting on a server and reading its metrics -------------------------------------------

import time as _time
import urllib.request as _urllib_request


def wait_for(condition, timeout_s: float = 15.0, poll_s: float = 0.02):
    """Poll ``condition`` until it returns something truthy or ``timeout_s`` passes; returns
    its last value (so ``assert wait_for(...)`` fails with the state it ended in)."""
    deadline = _time.monotonic() + timeout_s
    while _time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        _time.sleep(poll_s)
    return condition()


def metrics_text(metrics_port: int) -> str:
    """A server's Prometheus text, as a scraper gets it."""
    return _urllib_request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                   timeout=10).read().decode()


# ---- a real S3-compatible object store (SeaweedFS): the ``seaweedfs`` fixture ---------------

from seaweed import seaweedfs  # noqa: E402, F401  (module-scoped; tests/seaweed.py)
