"""What a user sees when a command cannot start: one line naming the cause, exit 1 or 2, no
traceback; and what a running server logs (startup, shutdown, access log)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ServerProcess, wait_for


def paramserve(*args, env=None, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "paramserve.service.cli", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


def one_line(result, *expected: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.mark.parametrize("command", [["serve"], ["health"], ["models"], ["check"],
                                     ["db", "upgrade"], ["delete", "x", "--yes"]])
def test_a_bad_variable_is_one_line_and_exit_2_for_every_command(command, tmp_path):
    bad = {"PARAMSERVE_TIMEOUT_S": "soon", "PARAMSERVE_LOG_LEVEL": "loud",
           "PARAMSERVE_MAX_BATCH_SIZE": "lots"}
    result = paramserve(*command, env=bad, cwd=tmp_path)
    assert result.returncode == 2
    one_line(result, "PARAMSERVE_", "error")
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing created


def test_a_bad_flag_value_is_one_line_naming_the_flag(tmp_path):
    result = paramserve("serve", "--workers", "0", cwd=tmp_path)
    assert result.returncode == 2
    one_line(result, "--workers", "at least 1")
    result = paramserve("models", "--timeout-s", "x")
    assert result.returncode == 2
    one_line(result, "--timeout-s", "must be a number")


def test_version():
    from importlib.metadata import version

    result = paramserve("--version")
    assert result.returncode == 0 and result.stdout == f"paramserve {version('paramserve')}\n"


def test_a_port_in_use_is_one_line_naming_the_address(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        grpc_port = paramserve("serve", "--data-dir", str(tmp_path / "a"), "--listen",
                               f"127.0.0.1:{port}", "--metrics-listen", "off")
        metrics_port = paramserve("serve", "--data-dir", str(tmp_path / "b"), "--listen",
                                  "127.0.0.1:0", "--metrics-listen", f"127.0.0.1:{port}")
    assert grpc_port.returncode == 1
    one_line(grpc_port, f"cannot listen on 127.0.0.1:{port}", "--listen")
    assert metrics_port.returncode == 1
    one_line(metrics_port, f"cannot serve metrics on 127.0.0.1:{port}", "--metrics-listen")


def test_an_unusable_data_dir_is_one_line_naming_the_path(tmp_path):
    data = tmp_path / "data"
    (data / "registry.db").mkdir(parents=True)  # no SQLite file can be opened there, root or not
    result = paramserve("serve", "--data-dir", str(data), "--listen", "127.0.0.1:0",
                        "--metrics-listen", "off")
    assert result.returncode == 1
    one_line(result, f"cannot open the registry database {data / 'registry.db'}",
             f"check that {data} is a directory this user can write")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    result = paramserve("serve", "--data-dir", str(not_a_dir / "data"), "--listen",
                        "127.0.0.1:0", "--metrics-listen", "off")
    assert result.returncode == 1
    one_line(result, str(not_a_dir / "data"))


def test_check_on_a_directory_without_a_registry_creates_nothing(tmp_path):
    missing = tmp_path / "typo"
    result = paramserve("check", "--data-dir", str(missing))
    assert result.returncode == 1
    one_line(result, f"data dir {missing} does not exist")
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = paramserve("check", "--data-dir", str(empty))
    assert result.returncode == 1
    one_line(result, f"{empty} holds no registry", "--data-dir")
    assert list(empty.iterdir()) == []
    url = f"sqlite:///{tmp_path / 'other.db'}"
    result = paramserve("check", "--data-dir", str(empty), "--registry-url", url)
    assert result.returncode == 1 and not (tmp_path / "other.db").exists()


def test_check_of_a_real_registry_still_passes(tmp_path):
    assert paramserve("db", "upgrade", "--data-dir", str(tmp_path)).returncode == 0
    result = paramserve("check", "--data-dir", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] is True


def test_the_server_logs_startup_and_shutdown_and_an_access_line_per_rpc(tmp_path):
    from paramserve.registry.errors import NotFound
    from paramserve.service.client import Client

    server = ServerProcess(tmp_path / "data", "--access-log")
    try:
        with Client(server.address) as client:
            client.list_models()
            with pytest.raises(NotFound):
                client.list_versions("no-such")
        wait_for(lambda: "ListVersions" in server.log_path.read_text())
    finally:
        assert server.stop() == 0
    log = server.log_path.read_text()
    assert re.search(rf"INFO serving on 127\.0\.0\.1:{server.port}: data dir "
                     rf"{re.escape(str((tmp_path / 'data').resolve()))}, registry sqlite:///"
                     r".*registry\.db, device auto \(", log), log
    assert re.search(r"INFO serving on .*, event loop asyncio\n", log), log  # the default
    assert re.search(r"INFO rpc ListModels model=- status=OK ms=\d+\.\d\d\n", log), log
    assert re.search(r"INFO rpc ListVersions model=no-such status=NOT_FOUND ms=\d+\.\d\d\n",
                     log), log
    assert "INFO stopping: in-flight requests get 10 s to finish" in log
    assert log.rstrip().endswith("INFO stopped")


def test_the_server_serves_on_uvloop_too(tmp_path):
    """``--event-loop uvloop``: the same server on libuv's loop (every other test's server
    runs on the default, the standard library's)."""
    import torch

    from paramserve.registry import get_architecture
    from paramserve.service.client import Client

    server = ServerProcess(tmp_path / "data", "--event-loop", "uvloop")
    try:
        module = get_architecture("sequential_mlp").build({}, seed=0)
        x = torch.rand(2, 20)
        with Client(server.address) as client:
            client.create_model("mlp", "sequential_mlp")
            client.upload("mlp", module.state_dict())
            with torch.inference_mode():
                assert torch.allclose(client.infer("mlp", x), module(x), atol=1e-6)
    finally:
        assert server.stop() == 0
    assert re.search(r"INFO serving on .*, event loop uvloop\n", server.log_path.read_text())


def test_the_access_log_sees_what_auth_refuses(tmp_path):
    from paramserve.service.client import Client, ServerError

    tokens = tmp_path / "tokens"
    tokens.write_text("full-token\n")
    server = ServerProcess(tmp_path / "data", "--access-log", "--auth-token-file", str(tokens))
    try:
        with Client(server.address) as client:
            with pytest.raises(ServerError, match="UNAUTHENTICATED"):
                client.list_models()
        with Client(server.address, token="full-token") as client:
            client.create_model("guarded", "small_mlp")
        wait_for(lambda: "CreateModel" in server.log_path.read_text())
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert re.search(r"rpc ListModels model=- status=UNAUTHENTICATED ms=", log), log
    assert re.search(r"rpc CreateModel model=guarded status=OK ms=", log), log


def test_json_logs_carry_the_access_fields(tmp_path):
    from paramserve.service.client import Client

    server = ServerProcess(tmp_path / "data", "--access-log", "--log-format", "json")
    try:
        with Client(server.address) as client:
            client.create_model("logged", "small_mlp")
        wait_for(lambda: "CreateModel" in server.log_path.read_text())
    finally:
        server.stop()
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines()]
    access = next(line for line in lines if line.get("method") == "CreateModel")
    assert access["model"] == "logged" and access["status"] == "OK"
    assert access["ms"] >= 0 and access["level"] == "info"
    assert access["logger"] == "paramserve.access"
    assert lines[-1]["message"] == "stopped"


def test_the_registry_url_is_logged_with_its_password_masked(tmp_path):
    """A URL with a password that cannot be reached: the one-line error masks it too."""
    url = "postgresql+psycopg://user:s3cret@127.0.0.1:9/paramserve"
    result = paramserve("serve", "--data-dir", str(tmp_path), "--registry-url", url,
                        "--listen", "127.0.0.1:0", "--metrics-listen", "off")
    assert result.returncode == 1
    one_line(result, "cannot open the registry database", "user:***@127.0.0.1:9")
    assert "s3cret" not in result.stderr


def test_access_line_format():
    from paramserve.protos import registry_pb2
    from paramserve.service.access_log import access_line, model_of

    assert access_line("ModelInfer", "mlp", "OK", 1.2345) == \
        "rpc ModelInfer model=mlp status=OK ms=1.23"
    assert model_of(registry_pb2.ListVersionsRequest(model="m")) == "m"
    assert model_of(registry_pb2.ListModelsRequest()) == "-"
    assert model_of(None) == "-"


def test_paths_in_errors_are_the_ones_given(tmp_path):
    result = paramserve("upload", "m", str(tmp_path / "nope.pt"))
    assert result.returncode == 1
    one_line(result, str(Path(tmp_path / "nope.pt")))


class _FakeServer:
    """What ``_bind`` needs of a grpc.aio server: older grpcio returns 0 for a port it cannot
    have, newer raises RuntimeError."""

    def __init__(self, outcome):
        self.outcome = outcome

    def add_insecure_port(self, address):
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


@pytest.mark.parametrize("outcome", [0, RuntimeError("Failed to bind to address")])
def test_bind_names_the_address_whichever_way_grpc_refuses(outcome):
    from paramserve.service.config import ServerConfig
    from paramserve.service.server import _bind

    config = ServerConfig(listen="127.0.0.1:0")
    with pytest.raises(OSError, match=r"cannot listen on 127\.0\.0\.1:0: .*--listen"):
        _bind(_FakeServer(outcome), config, None, reuse_port=False)
    assert _bind(_FakeServer(4321), config, None, reuse_port=False) == 4321


def test_delete_asks_on_a_terminal_and_deletes_nothing_on_no(tmp_path):
    """A terminal on stdin: the question is asked, 'n' keeps everything (exit 1), and no
    server is even contacted."""
    import pty

    leader, follower = pty.openpty()
    try:
        os.write(leader, b"n\n")
        result = subprocess.run([sys.executable, "-m", "paramserve.service.cli", "--server",
                                 "127.0.0.1:9", "delete", "mlp", "--version", "2"],
                                stdin=follower, capture_output=True, text=True, timeout=60)
    finally:
        os.close(leader)
        os.close(follower)
    assert result.returncode == 1, result.stderr
    assert "delete version 2 of model mlp? [y/N]" in result.stdout
    assert result.stderr == "paramserve: nothing deleted\n"


def test_a_flag_file_that_cannot_be_read_is_a_usage_error_naming_the_flag(tmp_path):
    for flags, named in ((["--tls-cert", str(tmp_path / "c.pem"), "--tls-key",
                           str(tmp_path / "k.pem")], "--tls-key"),
                         (["--auth-token-file", str(tmp_path / "tokens")], "--auth-token-file")):
        result = paramserve("serve", "--data-dir", str(tmp_path / "data"), "--listen",
                            "127.0.0.1:0", "--metrics-listen", "off", *flags)
        assert result.returncode == 2
        one_line(result, f"cannot read {named} {tmp_path}")
