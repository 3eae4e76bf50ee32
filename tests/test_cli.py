"""The ``paramserve`` CLI as a user runs it: subprocesses against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import reference_module
from safetensors.torch import save_file


def cli(server, *args, check=True):
    result = subprocess.run([sys.executable, "-m", "paramserve.service.cli", "--server",
                             server.address, *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_round_trip_create_upload_infer_download(server, tmp_path):
    module = reference_module("tied_mlp", False)
    save_file({k: v.clone() for k, v in module.state_dict().items()}, tmp_path / "w.safetensors")
    assert "created model cli-tied" in cli(server, "create", "cli-tied", "--architecture",
                                           "tied_mlp").stdout
    upload = cli(server, "upload", "cli-tied", str(tmp_path / "w.safetensors"), "--alias",
                 "production")
    assert "version 1 (alias production)" in upload.stdout
    assert upload.stderr == ""  # no progress bar: stderr is not a terminal
    x = torch.rand(3, 4)
    np.save(tmp_path / "x.npy", x.numpy())
    cli(server, "infer", "cli-tied@production", "--input", str(tmp_path / "x.npy"), "--output",
        str(tmp_path / "y.npy"))
    assert np.allclose(np.load(tmp_path / "y.npy"), module(x).detach().numpy(), atol=1e-6)
    cli(server, "download", "cli-tied@1", "-o", str(tmp_path / "back.pt"))
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert all(torch.equal(back[k], v) for k, v in module.state_dict().items())

    cli(server, "patch", "cli-tied", "2.weight[0, 0]", "100")
    cli(server, "init", "cli-tied@1", "normal(0, 0.01)", "--module", "0", "--seed", "3")
    cli(server, "alias", "cli-tied", "production", "2")
    versions = json.loads(cli(server, "versions", "cli-tied", "--json").stdout)
    assert [(v["number"], v["origin"], v["parent"]) for v in versions] == [
        (1, "upload", None), (2, "patch", 1), (3, "init", 1)]
    assert versions[1]["aliases"] == ["production"]
    params = json.loads(cli(server, "params", "cli-tied@production", "--json").stdout)
    tied = {p["name"]: p["tied_with"] for p in params}
    assert tied["2.weight"] == ["4.weight"]
    value = json.loads(cli(server, "params", "cli-tied@2", "4.weight[0, 0]", "--values",
                           "--json").stdout)
    assert value["values"] == 100.0
    assert "Linear(in_features=8, out_features=8" in cli(server, "tree", "cli-tied").stdout
    models = json.loads(cli(server, "models", "--json").stdout)
    assert any(m["name"] == "cli-tied" and m["aliases"] == {"production": 2} for m in models)
    archs = json.loads(cli(server, "architectures", "--json").stdout)
    assert {"name": "rgnet", "batchable": True}.items() <= next(
        a for a in archs if a["name"] == "rgnet").items()
    assert "SERVING" in cli(server, "health").stdout


def test_errors_print_one_line_and_exit_non_zero(server, tmp_path):
    result = cli(server, "versions", "no-such-model", check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "not found" in result.stderr
    result = cli(server, "upload", "x", str(tmp_path / "missing.pt"), check=False)
    assert result.returncode == 1 and "no such file" in result.stderr
    result = subprocess.run([sys.executable, "-m", "paramserve.service.cli", "--server",
                             "127.0.0.1:9", "--timeout-s", "2", "models"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and result.stderr.count("\n") == 1
    assert "UNAVAILABLE" in result.stderr


def test_delete_of_an_aliased_version_needs_force_and_says_what_it_removed(server, tmp_path):
    from paramserve.service.client import Client

    path = tmp_path / "small.safetensors"
    save_file(reference_module("small_mlp", False).state_dict(), str(path))
    cli(server, "create", "aliased", "--architecture", "small_mlp")
    cli(server, "upload", "aliased", str(path), "--alias", "production", "--quiet")
    cli(server, "alias", "aliased", "staging", "1")
    refused = cli(server, "delete", "aliased", "--version", "1", "--yes", check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "production" in refused.stderr and "staging" in refused.stderr
    assert "--force" in refused.stderr
    with Client(server.address) as client:
        assert [v.number for v in client.list_versions("aliased")] == [1]
    done = cli(server, "delete", "aliased", "--version", "1", "--force", "--yes")
    assert "deleted aliased version 1" in done.stdout
    assert "removed aliases: production, staging" in done.stdout
    with Client(server.address) as client:
        assert client.list_versions("aliased") == []
        assert client.get_model("aliased").aliases == {}


def run_cli(*args, stdin=None, env=None):
    """The CLI with the server given after the command, as a user may type it."""
    return subprocess.run([sys.executable, "-m", "paramserve.service.cli", *args],
                          capture_output=True, text=True, timeout=120, stdin=stdin,
                          env={**os.environ, **(env or {})})


def uploaded(server, tmp_path, name: str, architecture: str = "small_mlp"):
    module = reference_module(architecture, False)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.clone() for k, v in module.state_dict().items()}, str(path))
    cli(server, "create", name, "--architecture", architecture)
    cli(server, "upload", name, str(path))
    return module, path


def test_global_flags_after_the_command(server, tmp_path):
    uploaded(server, tmp_path, "after")
    listing = run_cli("models", "--server", server.address, "--json", "--timeout-s", "30")
    assert listing.returncode == 0, listing.stderr
    assert any(m["name"] == "after" for m in json.loads(listing.stdout))
    versions = run_cli("versions", "after", "--json", env={"PARAMSERVE_SERVER": server.address})
    assert [v["number"] for v in json.loads(versions.stdout)] == [1]


def test_infer_writes_npy_equal_to_the_in_process_module_and_prints_json(server, tmp_path):
    module, _ = uploaded(server, tmp_path, "inferred")
    x = torch.rand(3, 4)
    np.save(tmp_path / "x.npy", x.numpy())
    expected = module(x).detach().numpy()
    saved = run_cli("infer", "inferred", "--input", str(tmp_path / "x.npy"), "--output",
                    str(tmp_path / "y.out"), "--server", server.address)
    assert saved.returncode == 0, saved.stderr
    assert saved.stdout == f"saved output [3, 1] float32 to {tmp_path / 'y.out'}\n"
    y = np.load(tmp_path / "y.out", allow_pickle=False)  # .npy under the name given
    assert y.dtype == expected.dtype and np.allclose(y, expected, atol=1e-6)
    printed = json.loads(cli(server, "infer", "inferred", "--input",
                             str(tmp_path / "x.npy")).stdout)
    assert printed["shape"] == [3, 1] and printed["dtype"] == "float32"
    assert np.allclose(np.array(printed["data"], np.float32), expected, atol=1e-6)


def test_delete_refuses_without_yes_when_stdin_is_not_a_terminal(server, tmp_path):
    uploaded(server, tmp_path, "kept")
    refused = run_cli("--server", server.address, "delete", "kept", stdin=subprocess.DEVNULL)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "--yes" in refused.stderr
    assert [v["number"] for v in json.loads(cli(server, "versions", "kept", "--json").stdout)] \
        == [1]
    assert "deleted model kept" in cli(server, "delete", "kept", "--yes").stdout


def test_upload_says_whose_sha256_it_prints(server, tmp_path):
    _, path = uploaded(server, tmp_path, "digests")
    stored = json.loads(cli(server, "versions", "digests", "--json").stdout)[0]["sha256"]
    again = cli(server, "upload", "digests", str(path)).stdout
    import hashlib

    own = hashlib.sha256(path.read_bytes()).hexdigest()
    assert f"sha256 {stored} (the stored blob's" in again
    assert own == stored or f"the file's own sha256 is {own}" in again


def test_every_command_has_examples_in_its_help():
    from paramserve.service.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        text = sub.format_help()
        assert "examples:\n  paramserve " in text, name
        assert "global flags" in text and "exit status" in text, name


def imported(*args) -> set[str]:
    """Which of torch, numpy and the protobuf runtime a command imported."""
    code = ("import runpy, sys; sys.argv = ['paramserve', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('paramserve.service.cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'google.protobuf') if m in sys.modules),"
            " file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                            text=True, timeout=120)
    return set(json.loads(result.stderr.strip().splitlines()[-1].replace("'", '"')))


def test_health_imports_neither_torch_nor_numpy_nor_protobuf(server):
    assert imported("--server", server.address, "health") == set()
    assert imported("--version") == set()


def test_health_reads_the_messages_grpc_health_defines():
    from grpc_health.v1 import health_pb2

    from paramserve.service.cli_health import STATUS_NAMES, health_status

    assert health_pb2.HealthCheckRequest(service="").SerializeToString() == b""
    names = health_pb2.HealthCheckResponse.ServingStatus
    assert STATUS_NAMES == {number: names.Name(number) for number in names.values()}
    for number in names.values():
        message = health_pb2.HealthCheckResponse(status=number).SerializeToString()
        assert health_status(message) == number
        # fields a newer version may add (varint, bytes, fixed64, fixed32) are skipped
        extra = b"\x10\x96\x01" + b"\x1a\x03abc" + b"\x21" + bytes(8) + b"\x2d" + bytes(4)
        assert health_status(extra + message) == number
    with pytest.raises(ValueError, match="truncated"):
        health_status(b"\x08")


def test_health_of_a_stopped_or_unhealthy_server(server):
    result = run_cli("--server", "127.0.0.1:9", "health", "--wait-s", "1")
    assert result.returncode == 3 and result.stderr == "paramserve: unhealthy: UNAVAILABLE\n"


def test_client_commands_import_no_torch(server):
    assert "torch" not in imported("--server", server.address, "models")


def test_a_progress_bar_is_drawn_only_on_a_terminal(server, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    _, path = uploaded(server, tmp_path, "barred")
    leader, follower = pty.openpty()
    # a terminal of 80 columns (a new pty has 0, and tqdm draws a bar that wide)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        result = subprocess.run([sys.executable, "-m", "paramserve.service.cli", "--server",
                                 server.address, "upload", "barred", str(path)],
                                stdout=subprocess.PIPE, stderr=follower, text=True, timeout=120)
        os.close(follower)
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(leader)
    assert result.returncode == 0
    assert b"upload barred.safetensors" in drawn  # tqdm's label, on the terminal
    quiet = cli(server, "upload", "barred", str(path))  # stderr a pipe: no bar
    assert quiet.stderr == ""
